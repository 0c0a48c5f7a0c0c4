"""A small ReLU sparse autoencoder, trained on residual activations and saved in the
SAELens folder layout (``cfg.json`` + ``sae_weights.safetensors``, architecture
``standard``), so SAELens itself loads it."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def train_sae(acts: torch.Tensor, d_sae: int, *, steps: int = 600, lr: float = 3e-3,
              l1: float = 1e-3, batch_size: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """Standard SAE: ``relu((x − b_dec) W_enc + b_enc) W_dec + b_dec`` with an L1 penalty."""
    gen = torch.Generator().manual_seed(seed)
    x = acts.float()
    d = x.shape[1]
    w_dec = torch.randn(d_sae, d, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": w_dec.T.clone().requires_grad_(True),
        "b_enc": torch.zeros(d_sae, requires_grad=True),
        "W_dec": w_dec.clone().requires_grad_(True),
        "b_dec": x.mean(0).clone().requires_grad_(True),
    }
    opt = torch.optim.Adam(params.values(), lr=lr)
    scale = float(x.var(0).sum())
    for _ in range(steps):
        batch = x[torch.randint(0, x.shape[0], (batch_size,), generator=gen)]
        z = torch.relu((batch - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        rec = z @ params["W_dec"] + params["b_dec"]
        loss = ((rec - batch) ** 2).sum(1).mean() / scale + l1 * (
            z * params["W_dec"].norm(dim=1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().contiguous() for k, v in params.items()}


def sae_reconstruct(sae: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    z = torch.relu((x.float() - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"])
    return z @ sae["W_dec"] + sae["b_dec"]


def nmse(x: torch.Tensor, rec: torch.Tensor) -> float:
    """Normalised MSE: ‖x − x̂‖² / ‖x − mean(x)‖²."""
    x = x.double()
    return float(((rec.double() - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def save_saelens(folder: str | Path, sae: dict[str, torch.Tensor], *, hook_name: str,
                 model_name: str = "") -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d_sae, d_in = sae["W_dec"].shape
    cfg = {
        "architecture": "standard", "d_in": int(d_in), "d_sae": int(d_sae),
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"hook_name": hook_name, "model_name": model_name,
                     "model_class_name": "AutoModelForCausalLM"},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    save_file(dict(sae), str(folder / "sae_weights.safetensors"), metadata={"format": "pt"})
    return folder
