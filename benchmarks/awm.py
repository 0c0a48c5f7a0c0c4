"""AWM, the attention-weight-matching model-identity baseline, reimplemented for the benchmarks.

AWM: Zeng, Chen, He, Wang, Lin, "AWM: Accurate Weight-Matrix Fingerprint for Large Language
Models" (arXiv 2510.06738, ICLR 2026); read from its repository (LUMIA-Group/AWM, ``main.py``
and ``similarity_metrics.py`` at commit bc20ff8). What it computes, and what is kept here:

1. **Alignment of the residual coordinates by the embedding columns.** The shared vocabulary
   is the set of token strings both tokenizers have; the embedding rows of those tokens are
   taken from each model (E_a, E_b: n_shared × d). The model with the wider embedding is the
   *base*, the other the *target* (the first model when the widths are equal). Cost
   ``1 - |cos|`` between every base column and every target column (cosine over the shared
   tokens, uncentred, as scikit-learn's ``cosine_similarity``), solved as a (rectangular)
   linear assignment problem (``scipy.optimize.linear_sum_assignment``, as AWM): every target
   coordinate j gets a base coordinate ``idx[j]`` and the sign ``s[j]`` of their cosine. A
   signed permutation when the widths agree, a signed selection when the target is narrower
   (pruned).
2. **Unbiased linear CKA of the attention weights.** Per layer, the base's W_q and W_k
   (out × d_base) restricted and signed, ``W[:, idx] · diag(s)``, against the target's
   (out × d_target); the samples of the CKA are the d_target residual coordinates, the
   features the output rows (so any rotation of heads, any head or row permutation, any
   scaling leaves it unchanged). Unbiased HSIC (Song et al. 2012: the U-statistic centring of
   AWM's ``_center_gram(unbiased=True)``), CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), 0
   when either variance is under 1e-8.
3. **Layers.** Equal depths: layer i against layer i. Different depths: AWM matches layers by
   a linear assignment on the negated mean of the Wq and Wk CKA of every layer pair (all
   n_a × n_b pairs computed), min(n_a, n_b) matched pairs, each keyed by the first model's
   layer. Kept as is (so a pruned-depth or up-scaled model is handled by AWM's own rule).
4. **Score.** The mean over (matched) layers of the Wq CKA and of the Wk CKA; the score is
   the mean of the two ("Wq_Wk_weights" in AWM's output: despite its name, the average of the
   two CKAs, not a CKA of the product W_q·W_kᵀ). AWM prints it with an absolute Z-score
   against its 90 negative pairs: |score − 0.00375| / 0.0028 (mean 0.375 %; the standard
   deviation, its code notes, was not given in the paper).

Decision. AWM's code states no threshold (the paper reports ROC curves, AUC and partial AUC;
every negative pair scored near 0, every positive pair's Z-score was 12 or more). Here:
*related* when the score lies more than :data:`Z_THRESHOLD` = 3 of AWM's negative-pair
standard deviations above their mean (score > 1.215 %). The threshold is ours; the reference
mean and deviation are AWM's.

Differences from AWM's code, none of which changes a score:

* models are opened through gaugefix (``gaugefix.model.open_model``): checkpoint directories
  and GGUF files alike (a GGUF tensor dequantised as transformers loads it: llama.cpp's Q/K
  row order undone);
* the token strings come from ``gaugefix.tokens.token_strings`` (tokenizer.json's vocabulary
  *and* its added tokens, or a GGUF file's token array; AWM reads tokenizer.json's
  ``model.vocab`` only); a string named by two ids keeps the lower;
* the weights are streamed: the embeddings and at most two layers' Q and K (one of each
  model) are held at once; for different depths the second model's layers are read again for
  every layer of the first (AWM loads both state dicts whole);
* the CKA is computed in float64 (AWM: float32 Gram matrices, float64 means).

    python benchmarks/awm.py A B      # prints the result as JSON
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

NEG_MEAN = 0.00375  # AWM main.py: mean score of its 90 negative (independent) pairs
NEG_STD = 0.0028  # AWM main.py ("the standard deviation for negative pairs was not specified")
Z_THRESHOLD = 3.0  # ours: AWM's code sets none
VAR_EPS = 1e-8  # AWM's cka_from_features: a variance under this gives CKA 0

# AWM's get_word_embedding_weight: the embedding's names, in its order
EMBEDDING_KEYS = (
    "model.decoder.embed_tokens.weight", "gpt_neox.embed_in.weight",
    "model.embed_tokens.weight", "transformer.embedding.word_embeddings.weight",
    "transformer.word_embeddings.weight", "word_embeddings.weight",
    "decoder.embed_tokens.weight", "transformer.wte.weight", "wte.weight",
    "language_model.model.embed_tokens.weight", "llm.model.embed_tokens.weight",
    "model.transformer.wte.weight", "internlm_model.model.embed_tokens.weight",
)
_LAYER = re.compile(r"\.(layers|h|blocks)\.(\d+)\.")


# ---------------------------------------------------------------------------- reading
def _open(path: str | Path) -> Any:
    from gaugefix.model import open_model

    return open_model(Path(path))


def vocabulary(model: Any) -> dict[str, int]:
    """Token string -> id (the lower id when a string is named twice)."""
    from gaugefix.tokens import token_strings

    strings = token_strings(model)
    if strings is None:
        raise ValueError(f"{model.name}: no tokenizer to read token strings from")
    out: dict[str, int] = {}
    for i, s in enumerate(strings):
        if s is not None and s not in out:
            out[s] = i
    return out


def embedding_key(model: Any) -> str:
    for key in EMBEDDING_KEYS:
        if key in model.shapes:
            return key
    raise ValueError(f"{model.name}: no word embedding among AWM's names")


def attention_keys(model: Any) -> dict[int, tuple[str, str]]:
    """Layer -> (W_q key, W_k key): AWM's LLaMA/Qwen2-style case (separate q_proj, k_proj
    under ``model.layers``), the one every model of the zoo has."""
    q: dict[int, str] = {}
    k: dict[int, str] = {}
    for key in model.shapes:
        m = _LAYER.search(key)
        if m is None or "model.layers" not in key:
            continue
        if "self_attn.q_proj.weight" in key:
            q[int(m.group(2))] = key
        elif "self_attn.k_proj.weight" in key:
            k[int(m.group(2))] = key
    layers = sorted(set(q) & set(k))
    if not layers:
        raise ValueError(f"{model.name}: no q_proj/k_proj attention weights")
    return {i: (q[i], k[i]) for i in layers}


# ---------------------------------------------------------------------------- the parts
def align(emb_a: np.ndarray, emb_b: np.ndarray) -> dict[str, Any]:
    """AWM's alignment of the residual coordinates from the shared tokens' embedding rows
    (``emb_a``, ``emb_b``: n_shared × d_a, n_shared × d_b, the same token on each row).
    Returns ``base_is_first``, ``indices`` (base coordinate of each target coordinate) and
    ``signs``."""
    from scipy.optimize import linear_sum_assignment

    base_is_first = emb_a.shape[1] >= emb_b.shape[1]
    base, target = (emb_a, emb_b) if base_is_first else (emb_b, emb_a)
    bn = base / np.maximum(np.linalg.norm(base, axis=0, keepdims=True), 1e-300)
    tn = target / np.maximum(np.linalg.norm(target, axis=0, keepdims=True), 1e-300)
    sim = bn.T @ tn  # d_base x d_target: cosine of every base column with every target one
    base_idx, target_idx = linear_sum_assignment(1.0 - np.abs(sim))
    indices = base_idx[np.argsort(target_idx)]
    signs = np.sign(sim[indices, np.arange(target.shape[1])])
    return {"base_is_first": base_is_first, "indices": indices, "signs": signs,
            "mean_abs_cos": float(np.abs(sim[indices, np.arange(target.shape[1])]).mean())}


def _centred_gram(x: Any) -> Any:
    """AWM's ``_center_gram(x @ x.T, unbiased=True)`` (the U-statistic centring)."""
    gram = x @ x.T
    n = gram.shape[0]
    gram.fill_diagonal_(0)
    means = gram.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    gram = gram - means[:, None] - means[None, :]
    gram.fill_diagonal_(0)
    return gram


def _cka(k: Any, var_k: float, l_: Any, var_l: float) -> float:
    if var_k < VAR_EPS or var_l < VAR_EPS:
        return 0.0
    return float((k * l_).sum()) / float(np.sqrt(var_k * var_l))


def cka(x: Any, y: Any) -> float:
    """Unbiased linear CKA of two feature matrices with the same samples (rows)."""
    import torch

    k = _centred_gram(torch.as_tensor(x, dtype=torch.float64))
    l_ = _centred_gram(torch.as_tensor(y, dtype=torch.float64))
    return _cka(k, float((k * k).sum()), l_, float((l_ * l_).sum()))


class _Side:
    """One model's Q and K, read a layer at a time as the features AWM compares (rows: the
    target's residual coordinates), as centred Gram matrices with their variances."""

    def __init__(self, model: Any, keys: dict[int, tuple[str, str]],
                 select: tuple[Any, Any] | None) -> None:
        self.model, self.keys, self.select = model, keys, select

    def grams(self, layer: int) -> list[tuple[Any, float]]:
        import torch

        out = []
        for key in self.keys[layer]:
            w = self.model.tensor(key).to(torch.float64)
            if self.select is not None:
                idx, signs = self.select
                w = w.index_select(1, idx) * signs
            g = _centred_gram(w.T)
            out.append((g, float((g * g).sum())))
        return out


def _pair(ga: list[tuple[Any, float]], gb: list[tuple[Any, float]]) -> tuple[float, float]:
    return (_cka(ga[0][0], ga[0][1], gb[0][0], gb[0][1]),
            _cka(ga[1][0], ga[1][1], gb[1][0], gb[1][1]))


# ---------------------------------------------------------------------------- the score
def awm_score(a_path: str | Path, b_path: str | Path, *,
              z_threshold: float = Z_THRESHOLD) -> dict[str, Any]:
    """AWM's similarity of two models (checkpoint directories or GGUF files): the score, its
    parts per layer, the decision (see the module docstring) and the seconds it took."""
    import torch
    from scipy.optimize import linear_sum_assignment

    t0 = time.perf_counter()
    ma, mb = _open(a_path), _open(b_path)
    va, vb = vocabulary(ma), vocabulary(mb)
    shared = sorted(set(va) & set(vb))
    if not shared:
        raise ValueError("the two models share no token string: AWM cannot align them")
    ids_a = torch.tensor([va[s] for s in shared])
    ids_b = torch.tensor([vb[s] for s in shared])
    emb_a = ma.tensor(embedding_key(ma)).index_select(0, ids_a).to(torch.float64).numpy()
    emb_b = mb.tensor(embedding_key(mb)).index_select(0, ids_b).to(torch.float64).numpy()
    al = align(emb_a, emb_b)
    del emb_a, emb_b
    t_align = time.perf_counter() - t0
    select = (torch.from_numpy(al["indices"]), torch.from_numpy(al["signs"]))
    ka, kb = attention_keys(ma), attention_keys(mb)
    sa = _Side(ma, ka, select if al["base_is_first"] else None)
    sb = _Side(mb, kb, None if al["base_is_first"] else select)
    la, lb = sorted(ka), sorted(kb)
    scores: dict[int, tuple[float, float]] = {}
    matched: list[tuple[int, int]] = []
    if len(la) == len(lb):  # AWM's direct_layer_matcher: the common layer numbers
        for i in sorted(set(la) & set(lb)):
            scores[i] = _pair(sa.grams(i), sb.grams(i))
            matched.append((i, i))
    else:  # AWM: every layer pair, then a linear assignment on −mean(q, k) CKA
        table = np.zeros((len(la), len(lb), 2))
        for r, i in enumerate(la):
            ga = sa.grams(i)
            for c, j in enumerate(lb):
                table[r, c] = _pair(ga, sb.grams(j))
        rows, cols = linear_sum_assignment(-table.mean(axis=2))
        for r, c in zip(rows, cols, strict=True):
            scores[la[r]] = tuple(table[r, c])
            matched.append((la[r], lb[c]))
    wq = float(np.mean([s[0] for s in scores.values()]))
    wk = float(np.mean([s[1] for s in scores.values()]))
    score = (wq + wk) / 2
    z = (score - NEG_MEAN) / NEG_STD
    d_a, d_b = ma.hidden_size, mb.hidden_size
    return {
        "score": score, "wq": wq, "wk": wk, "z": z, "abs_z": abs(z),
        "decision": "related" if z > z_threshold else "unrelated",
        "rule": f"related if (score - {NEG_MEAN}) / {NEG_STD} > {z_threshold:g}",
        "layers": {str(i): {"wq": s[0], "wk": s[1]} for i, s in sorted(scores.items())},
        "layer_map": matched,
        "depths": [len(la), len(lb)], "widths": [d_a, d_b],
        "shared_tokens": len(shared), "base": "a" if al["base_is_first"] else "b",
        "sign_flips": int((al["signs"] < 0).sum()),
        "alignment_mean_abs_cos": al["mean_abs_cos"],
        "align_seconds": t_align, "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="AWM's similarity of two models")
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--layers", action="store_true", help="print the per-layer values too")
    args = ap.parse_args()
    out = awm_score(args.a, args.b)
    if not args.layers:
        out.pop("layers")
        out.pop("layer_map")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
