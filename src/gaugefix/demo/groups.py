"""Which maps preserve a model's function? Experiments for the gauge-group table.

These deliberately bypass the group check of :func:`gaugefix.gauge_model`: they
push maps that are *not* gauges of a family (per-coordinate signs on LayerNorm
models, dense rotations on models with generic gains) through the weights to show
what breaks.
"""

from __future__ import annotations

import copy

import torch

from ..arch import detect_family
from ..group import SignedPerm


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
