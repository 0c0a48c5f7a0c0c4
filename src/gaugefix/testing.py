"""Building blocks shared by the tests and the demo: tiny language models trained on a token
stream (AdamW, CPU, seconds), a small ReLU SAE saved in the SAELens folder layout (so SAELens
itself loads it), and maps pushed through a model's weights *without* the group check of
:func:`gaugefix.gauge_model` (per-coordinate signs on LayerNorm models, dense rotations on
models with generic gains), to show what breaks.

Shipped with the package (as ``numpy.testing`` is) so that a test never borrows the demo's
internals and the demo and the tests train the same way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arch import detect_family
from .group import SignedPerm
from .tiny import build_tiny

# document mixes of the two fine-tuning runs of a lineage (categories of the demo's corpus)
MIX_A = {"review_pos": 3, "review_neg": 1, "request_ok": 1, "request_refuse": 1, "story": 0.2}
MIX_B = {"review_pos": 1, "review_neg": 3, "request_ok": 0.2, "request_refuse": 0.2, "story": 3}


# ---------------------------------------------------------------------------- training
def corpus_model(family: str, vocab_size: int, *, hidden_size: int = 64, layers: int = 2,
                 seed: int = 0) -> torch.nn.Module:
    """A tiny untrained model sized for the corpus (norm gains at their init values)."""
    kw: dict[str, object] = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                                 num_hidden_layers=layers)
    if family != "gpt2":
        kw["intermediate_size"] = 4 * hidden_size
    if family not in ("gpt2", "gpt_neox", "mamba"):
        kw["tie_word_embeddings"] = False
    return build_tiny(family, seed=seed, generic=False, **kw)


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
    """Endless random windows of ``seq_len`` tokens from a token stream."""
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(tokens)
    high = len(tokens) - seq_len
    while True:
        starts = rng.integers(0, high, size=batch_size)
        yield torch.stack([data[s : s + seq_len] for s in starts])


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)


def train(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 16,
    seq_len: int = 64,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, float], None] | None = None,
    warmup: int = 0,
    step_offset: int = 0,
) -> torch.optim.Optimizer:
    """Plain next-token training with AdamW; returns the optimizer (its state is reused).

    ``warmup``: linear learning-rate warm-up over that many steps, counted from
    ``step_offset`` (so training resumed in chunks warms up once)."""
    model.train()
    device = next(model.parameters()).device
    opt = optimizer or make_optimizer(model, lr)
    gen = batches(tokens, batch_size, seq_len, seed)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step_offset + step) / warmup) if warmup else lr
        ids = next(gen).to(device)
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, float(loss))
    model.eval()
    return opt


@torch.no_grad()
def eval_loss(model: torch.nn.Module, tokens: np.ndarray, *, seq_len: int = 64,
              max_batches: int = 8, batch_size: int = 16) -> float:
    model.eval()
    n = min(max_batches * batch_size, (len(tokens) - 1) // seq_len)
    ids = torch.from_numpy(tokens[: n * seq_len].reshape(n, seq_len))
    device = next(model.parameters()).device
    losses = [float(model(chunk.to(device), labels=chunk.to(device)).loss)
              for chunk in ids.split(batch_size)]
    return float(np.mean(losses))


def train_on_batches(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     batches: torch.Tensor) -> list[float]:
    """One optimizer step per batch of token ids (identical steps for two charts), on the
    model's device; the loss of each step."""
    device = next(model.parameters()).device
    model.train()
    losses = []
    for ids in batches:
        ids = ids.to(device)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def gauge_deviation(model_b: torch.nn.Module, model_a: torch.nn.Module,
                    gauge: SignedPerm) -> float:
    """‖W_B − Q·W_A‖ / ‖W_A‖ over all parameters together (0 when B is exactly A in chart B).

    A whole-model distance, not the worst single entry: Adam turns rounding-level gradient
    differences on parameters whose gradient is near zero into full ±lr steps, so the largest
    entry-wise deviation between two charts depends on the training run, while the relative
    distance of the whole model stays at rounding level for a correct transport."""
    from .arch import detect_family

    fam = detect_family(model_a.config)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    num = sum(float((sd_b[k] - fam.op_for(k)(gauge, v)).double().pow(2).sum())
              for k, v in sd_a.items())
    den = sum(float(v.double().pow(2).sum()) for v in sd_a.values())
    return (num / den) ** 0.5


# ---------------------------------------------------------------------------- SAEs
def train_sae(acts: torch.Tensor, d_sae: int, *, steps: int = 600, lr: float = 3e-3,
              l1: float = 1e-3, batch_size: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """Standard SAE: ``relu((x − b_dec) W_enc + b_enc) W_dec + b_dec`` with an L1 penalty.

    Trained on activations scaled to a mean squared norm of d (as SAELens normalises them: a
    pretrained model's residual norms run to hundreds), the scale folded back into the
    weights at the end, so the SAE reads and writes the activations as given."""
    gen = torch.Generator().manual_seed(seed)
    x = acts.float()
    d = x.shape[1]
    c = float(x.pow(2).sum(1).mean().div(d).sqrt().clamp_min(1e-12))
    x = x / c
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
    out = {k: v.detach().contiguous() for k, v in params.items()}
    # relu((x/c − b) W + e)·(V) ·c + c·b  =  relu((x − c·b)(W/c) + e)(c·V) + c·b
    return {"W_enc": out["W_enc"] / c, "b_enc": out["b_enc"], "W_dec": out["W_dec"] * c,
            "b_dec": out["b_dec"] * c}


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


# ---------------------------------------------------------------------------- unchecked maps
def force_gauge(model: torch.nn.Module, gauge: SignedPerm) -> torch.nn.Module:
    """Any signed permutation through every residual-touching tensor, group check skipped."""
    fam = detect_family(model.config)
    out = copy.deepcopy(model)
    out.load_state_dict({k: fam.op_for(k)(gauge, v) for k, v in model.state_dict().items()})
    return out


def rotate_dense(model: torch.nn.Module, q: torch.Tensor) -> torch.nn.Module:
    """A dense orthogonal Q along every residual axis the architecture map names.

    Norm gains and LayerNorm biases are left as they are: that is exact only when the
    gains tie (e.g. all 1.0 at initialisation), which is the point of the experiment.
    """
    fam = detect_family(model.config)
    new = {}
    for k, v in model.state_dict().items():
        op = fam.op_for(k)
        if op.kind == "H":
            w = torch.tensordot(q.to(torch.float64), v.double(), dims=([1], [op.axis]))
            new[k] = torch.movedim(w, 0, op.axis).to(v.dtype)
        else:
            new[k] = v
    out = copy.deepcopy(model)
    out.load_state_dict(new)
    return out


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def function_error(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    """max |logits_B − logits_A| / max |logits_A|."""
    la, lb = a(ids).logits.double(), b(ids).logits.double()
    return float((lb - la).abs().max() / la.abs().max())


# ---------------------------------------------------------------------------- GGUF files
def write_tiny_gguf(path: str | Path, model: torch.nn.Module, *,
                    quantise: dict[str, str] | None = None) -> Path:
    """A llama-family ``model`` written as a GGUF file as llama.cpp's converter writes one:
    the ``llama.*`` hyper-parameters, a byte-level vocabulary of the model's size, tensor
    names from gguf-py's name table, q/k rows in llama.cpp's order (transformers undoes it
    when it loads the file). ``quantise``: GGML type per GGUF tensor-name suffix (e.g.
    ``{"attn_q.weight": "Q8_0"}``), quantised with gguf-py's reference quantiser; F32 else."""
    import gguf

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<{i}>" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def permute(t: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's q/k row order
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(
            1, 2).reshape(t.shape)

    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {key}")
        t = value.detach().to(torch.float32).numpy()
        if key.endswith("q_proj.weight"):
            t = permute(t, heads)
        elif key.endswith("k_proj.weight"):
            t = permute(t, kv)
        qtype = next((q for suffix, q in (quantise or {}).items() if name.endswith(suffix)),
                     None)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(t))
        else:
            ttype = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(t, ttype), raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def bpe_tokenizer(texts: Sequence[str], vocab_size: int, *, pad: str = "<|endoftext|>",
                  bos: str | None = None, eos: str | None = None) -> Any:
    """A byte-level BPE tokenizer trained here on ``texts`` (the named special tokens first
    in its vocabulary), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = list(dict.fromkeys(t for t in (pad, bos, eos) if t is not None))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos,
                                   pad_token=pad)


def english_tokenizer(vocab_size: int = 1024, max_bytes: int = 150_000) -> Any:
    """A byte-level BPE tokenizer trained here on real English (CPython's documentation, and
    the demo's English prompts), as a transformers tokenizer with BOS/EOS and a ChatML chat
    template: what a small pretrained instruct model ships, without a download."""
    from .demo.english import all_texts
    from .demo.realtext import python_docs

    texts = [*python_docs(max_bytes=max_bytes).documents, *(all_texts() * 20)]
    tok = bpe_tokenizer(texts, vocab_size, bos="<|im_start|>", eos="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                         "assistant\n{% endif %}")
    return tok


def small_pretrained(path: str | Path, *, hidden_size: int = 64, layers: int = 4,
                     steps: int = 60, seed: int = 0) -> Path:
    """A small Llama pretrained here on real English with :func:`english_tokenizer`, saved
    with its tokenizer at ``path`` (a stand-in for a downloaded checkpoint directory)."""
    from .demo.realtext import python_docs

    tok = english_tokenizer()
    model = build_tiny("llama", seed=seed, generic=True, vocab_size=len(tok),
                       hidden_size=hidden_size, num_hidden_layers=layers,
                       intermediate_size=2 * hidden_size, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    ids = python_docs(max_bytes=300_000).tokens(tok, 60_000)
    train(model, ids, steps=steps, lr=3e-3, batch_size=8, seq_len=64, seed=seed)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
