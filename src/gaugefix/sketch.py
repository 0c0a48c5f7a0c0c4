"""Identity across widths, vocabularies and depths, from a small sketch of each model.

A :class:`Sketch` keeps what the test of derivation needs and nothing of the gauge:

* **token-keyed rows**: the embedding (and an untied unembedding) rows of a fixed sample of
  tokens — the :data:`SKETCH_TOKENS` tokens whose strings hash lowest (a bottom-k sample, so
  two vocabularies that share tokens share sampled tokens), keyed by string;
* **layer rows**: every layer tensor with one residual axis, viewed as rows along it, at every
  ``stride``-th row (a power of two fixed by the tensor's row count and the sketch's byte
  budget; two sketches of one shape share the rows at the coarser stride);
* the hashes of every token string (the shared vocabulary is counted exactly), the model's
  fingerprint and canonical gauge when it was recorded (``gaugefix fingerprint --record``).

:func:`relate_sketches` tests whether B derives from A:

1. **Coordinates** are matched on the token-keyed rows of the shared tokens (as AWM does):
   cos(B_i, A_j) of embedding columns, a maximum-weight matching of the narrower model's
   coordinates into the wider one's (signed: |cos|, the sign of the match kept; LayerNorm
   families: one global sign). The layer tensors play no part in it.
2. **Layers.** The sampled rows of every layer tensor are split by parity (two folds). On one
   fold, each of B's layers is mapped to the layer of A whose rows, moved by the matched
   coordinates, agree with it best (a layer dropped, duplicated or inserted is allowed: the
   map need not be monotone or onto).
3. **Test.** The map chosen on one fold is tested on the *other* fold's rows, with the null of
   :mod:`gaugefix.relation`: the statistic is the sum of cos(B_t, g(A_t)), the matched
   coordinates' entries of ``N`` (cross products over the test rows, normalised per tensor),
   and its null is a uniformly random injective (signed) map of the narrower side into the
   wider one — Hoeffding's bound for B_d families, the combinatorial normal tail otherwise.
   Neither the coordinates (tokens) nor the layer map (the other fold) saw the test rows.

Rows correspond only between tensors of one row count (a derivative keeps its heads and
neurons in place); tensors whose row counts differ are not compared.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import GaugefixError
from .group import SignedPerm
from .relation import NullSum, log10_p, null_sum, residual_rows

SKETCH_TOKENS = 8192  # token-keyed rows sampled
SKETCH_BYTES = 64 << 20  # float32 bytes of the sampled layer rows, all tensors together
MIN_SHARED_TOKENS = 64  # fewer shared sampled tokens: the coordinates are not matched
LAYER_ALPHA = 1e-3  # a layer of B whose own p-value is above this is reported unmatched
RECORD_VERSION = 1
RECORD_KIND = "gaugefix.fingerprint-record"

_FIRST_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
_UNEMBED = re.compile(r"(^|\.)(lm_head|output|embed_out)\.")
_POSITIONS = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)\.")


def _token_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


@dataclass
class Sketch:
    """A model as the test of derivation sees it (see the module docstring)."""

    name: str
    family: str
    hidden_size: int
    n_layers: int
    vocab_size: int
    signed: bool  # per-coordinate signs are gauges (B_d) or only a global one
    keyed_by: str  # "token" (strings) or "id" (the model ships no tokenizer)
    keys: list[str]  # the sampled tokens' keys, in row order of ``tokens``
    tokens: dict[str, np.ndarray]  # "embed" / "unembed" -> [len(keys), d]
    token_hashes: np.ndarray  # every token key's hash (uint64, sorted)
    layers: dict[str, dict[int, np.ndarray]]  # kind -> layer -> sampled rows [r, d]
    rows: dict[str, tuple[int, int]]  # kind -> (rows of the tensor, stride)
    fingerprint: str | None = None
    sha256: str | None = None
    chart_gauge: SignedPerm | None = None  # the model's canonical chart (recorded)

    # ------------------------------------------------------------------ from a model
    @classmethod
    def of(cls, model: Any, *, budget: int = SKETCH_BYTES) -> Sketch:
        """The sketch of an opened :class:`gaugefix.model.Model` (one tensor read at a time)."""
        from .tokens import token_strings

        d, vocab = model.hidden_size, model.vocab_size
        strings = token_strings(model)
        keyed_by = "id" if strings is None else "token"
        all_keys: dict[str, int] = {}
        for i in range(vocab):
            s = None if strings is None or i >= len(strings) else strings[i]
            key = f"#{i}" if strings is None else s
            if key is not None and key not in all_keys:
                all_keys[key] = i
        hashes = {k: _token_hash(k) for k in all_keys}
        keys = sorted(all_keys, key=hashes.__getitem__)[:SKETCH_TOKENS]
        ids = torch.tensor([all_keys[k] for k in keys], dtype=torch.long)
        tokens: dict[str, np.ndarray] = {}
        kinds: dict[str, dict[int, str]] = {}
        for key, op in sorted(model.plan.items()):
            if not op.one_stream or not op.signed:
                continue
            shape = model.shapes[key]
            m = _FIRST_INDEX.search(key)
            if m is None:
                if (len(shape) == 2 and shape[1 - op.residual_axis % 2] == vocab
                        and not _POSITIONS.search(key)):  # a table of positions, not tokens
                    role = "unembed" if _UNEMBED.search(key) else "embed"
                    rows = residual_rows(model.tensor(key), op.residual_axis, d)
                    tokens.setdefault(role, rows[ids].float().numpy())
                continue
            kind = key[:m.start()] + "*" + key[m.end():]
            kinds.setdefault(kind, {})[int(m.group())] = key
        n_tensors = sum(len(v) for v in kinds.values())
        per_tensor = max(1, budget // max(1, 4 * d * n_tensors))
        layers: dict[str, dict[int, np.ndarray]] = {}
        rows_of: dict[str, tuple[int, int]] = {}
        for kind, by_layer in kinds.items():
            n = {math.prod(model.shapes[k]) // d for k in by_layer.values()}
            if len(n) != 1:
                continue  # layers disagree on this tensor's shape: not one kind
            n_rows = n.pop()
            stride = 1 << max(0, math.ceil(math.log2(max(1.0, n_rows / per_tensor))))
            rows_of[kind] = (n_rows, stride)
            layers[kind] = {
                layer: residual_rows(model.tensor(key), model.plan[key].residual_axis, d)[::stride]
                .float().numpy().copy() for layer, key in sorted(by_layer.items())}
        return cls(model.name, model.family.name, d, model.n_layers, vocab,
                   model.family.allows_signs, keyed_by, keys, tokens,
                   np.array(sorted(hashes.values()), dtype=np.uint64), layers, rows_of)

    # ------------------------------------------------------------------ as a record file
    def save(self, path: Path) -> None:
        """Write the sketch as a safetensors record (rows in bfloat16); ``path`` is the
        temporary path of an atomic output."""
        from safetensors.torch import save_file

        tensors = {f"tokens/{r}": torch.from_numpy(a).to(torch.bfloat16)
                   for r, a in self.tokens.items()}
        tensors["token_hashes"] = torch.from_numpy(self.token_hashes.view(np.int64).copy())
        for kind, by_layer in self.layers.items():
            for layer, a in by_layer.items():
                tensors[f"layers/{layer}/{kind}"] = torch.from_numpy(a).to(torch.bfloat16)
        meta = {"kind": RECORD_KIND, "version": RECORD_VERSION, "name": self.name,
                "family": self.family, "hidden_size": self.hidden_size,
                "n_layers": self.n_layers, "vocab_size": self.vocab_size,
                "signed": self.signed, "keyed_by": self.keyed_by, "keys": self.keys,
                "rows": {k: list(v) for k, v in self.rows.items()},
                "fingerprint": self.fingerprint, "sha256": self.sha256,
                "chart_gauge": None if self.chart_gauge is None else self.chart_gauge.to_json()}
        save_file(tensors, str(path), metadata={"gaugefix": json.dumps(meta)})

    @staticmethod
    def check_record(path: Path) -> dict[str, Any]:
        """The record metadata of ``path``, from its header alone (a regular file, a
        safetensors header, gaugefix's record kind and version; else one error line)."""
        from .io import open_safetensors

        with open_safetensors(path, "fingerprint record", framework="numpy") as f:
            metadata = dict(f.metadata() or {})
        try:
            meta = json.loads(metadata["gaugefix"])
            if not isinstance(meta, dict) or meta.get("kind") != RECORD_KIND:
                raise KeyError("kind")
        except (KeyError, json.JSONDecodeError, TypeError):
            raise GaugefixError(f"{path}: not a gaugefix fingerprint record (no "
                                f"'{RECORD_KIND}' metadata; write one with `gaugefix "
                                "fingerprint MODEL --record FILE`)") from None
        if meta.get("version") != RECORD_VERSION:
            raise GaugefixError(f"{path}: fingerprint record version {meta.get('version')!r}; "
                                f"this gaugefix reads version {RECORD_VERSION}")
        return meta

    @classmethod
    def load(cls, path: Path) -> Sketch:
        """A record written by :meth:`save` (any other file: one error line naming it)."""
        from .io import load_safetensors

        meta = cls.check_record(path)
        tensors, _ = load_safetensors(path, "fingerprint record")
        try:
            return cls._from_parts(path, meta, tensors)
        except (KeyError, TypeError, ValueError) as exc:
            raise GaugefixError(f"{path}: a malformed fingerprint record ({exc})") from None

    @classmethod
    def _from_parts(cls, path: Path, meta: dict[str, Any], tensors: dict[str, Any]) -> Sketch:
        d = int(meta["hidden_size"])
        keys = [str(k) for k in meta["keys"]]
        tokens, layers = {}, {}
        for name, t in tensors.items():
            if name.startswith("tokens/"):
                tokens[name[7:]] = t.float().numpy()
            elif name.startswith("layers/"):
                _, layer, kind = name.split("/", 2)
                layers.setdefault(kind, {})[int(layer)] = t.float().numpy()
        for name, a in [*tokens.items(), *((k, v) for by in layers.values()
                                           for k, v in by.items())]:
            if a.ndim != 2 or a.shape[1] != d:
                raise ValueError(f"rows {name} of shape {list(a.shape)}, not [*, {d}]")
        if any(a.shape[0] != len(keys) for a in tokens.values()):
            raise ValueError(f"token rows do not match the {len(keys)} token keys")
        gauge = meta.get("chart_gauge")
        return cls(str(meta.get("name") or path.name), str(meta["family"]), d,
                   int(meta["n_layers"]), int(meta["vocab_size"]), bool(meta["signed"]),
                   str(meta["keyed_by"]), keys, tokens,
                   tensors["token_hashes"].numpy().view(np.uint64), layers,
                   {k: (int(v[0]), int(v[1])) for k, v in meta["rows"].items()},
                   meta.get("fingerprint"), meta.get("sha256"),
                   None if gauge is None else SignedPerm.from_json(gauge, str(path)))


# ---------------------------------------------------------------------------- the test
@dataclass
class CoordinateMap:
    """B's coordinates ``b`` matched to A's ``a`` with ``sign`` (B_b ≈ sign·A_a)."""

    b: np.ndarray
    a: np.ndarray
    sign: np.ndarray
    shared_tokens: int  # sampled tokens in both sketches (the fit's rows)
    mean_abs_cos: float


def _match_coordinates(a: Sketch, b: Sketch) -> CoordinateMap | None:
    """The coordinates matched on the shared tokens' rows (None: too few shared)."""
    import lap

    where_a = {k: i for i, k in enumerate(a.keys)}
    pairs = [(where_a[k], j) for j, k in enumerate(b.keys) if k in where_a]
    roles = sorted(set(a.tokens) & set(b.tokens))
    if len(pairs) < MIN_SHARED_TOKENS or not roles:
        return None
    ia = np.array([p[0] for p in pairs])
    ib = np.array([p[1] for p in pairs])
    cos = np.zeros((b.hidden_size, a.hidden_size))
    for role in roles:
        xa = a.tokens[role][ia].astype(np.float64)
        xb = b.tokens[role][ib].astype(np.float64)
        na, nb = np.linalg.norm(xa, axis=0), np.linalg.norm(xb, axis=0)
        cos += (xb.T @ xa) / np.maximum(np.outer(nb, na), 1e-300)
    cos /= len(roles)
    flip = cos.shape[0] > cos.shape[1]  # the narrower side's coordinates are matched
    c = cos.T if flip else cos
    if a.signed:
        _, rows_to, _ = lap.lapjv(-np.abs(c), extend_cost=True)
        sign = np.sign(c[np.arange(c.shape[0]), rows_to])
    else:  # one global sign: whichever gives the better matching
        best = None
        for s in (1.0, -1.0):
            total, to, _ = lap.lapjv(-s * c, extend_cost=True)
            if best is None or total < best[0]:
                best = (total, to, s)
        assert best is not None
        rows_to, sign = best[1], np.full(c.shape[0], best[2])
    sign[sign == 0] = 1.0
    rows = np.arange(c.shape[0])
    b_idx, a_idx = (rows_to, rows) if flip else (rows, rows_to)
    order = np.argsort(b_idx)
    return CoordinateMap(b_idx[order].astype(np.int64), a_idx[order].astype(np.int64),
                         sign[order], len(pairs),
                         float(np.abs(c[rows, rows_to]).mean()))


def _common_kinds(a: Sketch, b: Sketch) -> dict[str, tuple[int, int]]:
    """Kinds both sketches hold with one row count: (A's step, B's step) through their
    sampled rows to reach the rows both hold."""
    out = {}
    for kind in sorted(set(a.layers) & set(b.layers)):
        (na, sa), (nb, sb) = a.rows[kind], b.rows[kind]
        if na == nb:
            s = max(sa, sb)
            out[kind] = (s // sa, s // sb)
    return out


def _null_of(n: np.ndarray, cmap: CoordinateMap, signed: bool, tensors: int) -> NullSum:
    """The statistic of ``n`` ([d_B, d_A]) under the coordinate map and its null: a random
    injective (signed) map of the narrower side into the wider one (zero rows pad it)."""
    db, da = n.shape
    if db <= da:
        rows, cols, m = cmap.b, cmap.a, n
    else:
        rows, cols, m = cmap.a, cmap.b, n.T
    k, w = m.shape  # every one of the k narrower coordinates is matched
    sq = np.zeros((w, w))
    sq[:k] = m
    perm = np.empty(w, dtype=np.int64)
    perm[rows] = cols
    perm[k:] = np.setdiff1d(np.arange(w), cols)  # padding rows: the columns left over
    sign = np.ones(w, dtype=np.int64)
    sign[rows] = cmap.sign
    return null_sum(sq, SignedPerm(perm, sign), signed, tensors)


@dataclass
class LayerMatch:
    """B's layer ``b`` mapped to A's layer ``a`` (each fold's choice) and its own test."""

    b: int
    a: list[int]  # fold 0's and fold 1's choice
    p_value: float
    log10_p_value: float


@dataclass
class CrossRelation:
    """What :func:`relate_sketches` found (see the module docstring)."""

    coordinates: CoordinateMap
    p_value: float
    log10_p_value: float
    z: float
    mean_cosine: float
    tensors: int
    layers: list[LayerMatch] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    shared_vocabulary: int = 0
    widths: tuple[int, int] = (0, 0)
    depths: tuple[int, int] = (0, 0)
    vocabularies: tuple[int, int] = (0, 0)

    def gauge(self) -> SignedPerm | None:
        """A → B when every coordinate of both is matched (equal widths), else None."""
        d = self.widths[0]
        if self.widths[0] != self.widths[1] or len(self.coordinates.b) != d:
            return None
        perm = np.empty(d, dtype=np.int64)
        perm[self.coordinates.b] = self.coordinates.a
        sign = np.empty(d)
        sign[self.coordinates.b] = self.coordinates.sign
        return SignedPerm(perm, sign.astype(np.int64))

    def layer_map(self, alpha: float = LAYER_ALPHA) -> dict[int, int | None]:
        """B's layer -> A's (None: no layer of A tests as its origin at ``alpha``)."""
        return {m.b: (m.a[0] if m.a[0] == m.a[1] and m.p_value <= alpha else None)
                for m in self.layers}

    def describe(self) -> str:
        """What was found: "512 of 576 coordinates; layers ...; 40,000 shared tokens"."""
        parts = []
        wa, wb = self.widths
        if wa != wb:
            parts.append(f"{len(self.coordinates.b)} of {max(wa, wb)} coordinates")
        lm = self.layer_map()
        if self.depths[0] != self.depths[1] or any(lm[j] != j for j in lm):
            parts.append("layers " + describe_layer_map(lm, self.depths[0]))
        va, vb = self.vocabularies
        if va != vb or self.shared_vocabulary != va:
            parts.append(f"{self.shared_vocabulary:,} shared tokens")
        return "; ".join(parts)

    def evidence(self, alpha: float) -> dict[str, Any]:
        return {"p_value": self.p_value, "log10_p_value": round(self.log10_p_value, 3),
                "alpha": alpha, "z": round(self.z, 3),
                "held_out_mean_cosine": round(self.mean_cosine, 6),
                "tensors_tested": self.tensors, "kinds": self.kinds,
                "coordinates_matched": len(self.coordinates.b),
                "widths": list(self.widths), "depths": list(self.depths),
                "vocabularies": list(self.vocabularies),
                "shared_vocabulary": self.shared_vocabulary,
                "shared_sampled_tokens": self.coordinates.shared_tokens,
                "token_mean_abs_cosine": round(self.coordinates.mean_abs_cos, 6),
                "layer_map": {str(m.b): {"a": m.a, "p_value": m.p_value,
                                         "log10_p_value": round(m.log10_p_value, 3)}
                              for m in self.layers}}


def describe_layer_map(lm: dict[int, int | None], depth_a: int) -> str:
    """Runs of B's layers taken from consecutive layers of A: "A 0–19 → B 0–19, A 26–29 →
    B 20–23 (A 20–25 dropped)"; B's layers with no origin say so."""
    runs: list[list[int]] = []  # [b0, b1, a0] with a = a0 + (b - b0)
    unmatched: list[int] = []
    for j in sorted(lm):
        i = lm[j]
        if i is None:
            unmatched.append(j)
        elif runs and runs[-1][1] == j - 1 and runs[-1][2] + (j - runs[-1][0]) == i:
            runs[-1][1] = j
        else:
            runs.append([j, j, i])

    def span(lo: int, hi: int) -> str:
        return str(lo) if lo == hi else f"{lo}–{hi}"

    text = ", ".join(f"A {span(a0, a0 + b1 - b0)} → B {span(b0, b1)}" for b0, b1, a0 in runs)
    used = {i for i in lm.values() if i is not None}
    dropped = [i for i in range(depth_a) if i not in used]
    notes = []
    if dropped:
        notes.append(f"A {_spans(dropped)} dropped")
    counts: dict[int, int] = {}
    for i in lm.values():
        if i is not None:
            counts[i] = counts.get(i, 0) + 1
    if dup := sorted(i for i, c in counts.items() if c > 1):
        notes.append(f"A {_spans(dup)} repeated")
    if unmatched:
        notes.append(f"B {_spans(unmatched)} from no layer of A")
    return (text or "none matched") + (f" ({'; '.join(notes)})" if notes else "")


def _spans(xs: list[int]) -> str:
    out: list[list[int]] = []
    for x in xs:
        if out and out[-1][1] == x - 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ", ".join(str(lo) if lo == hi else f"{lo}–{hi}" for lo, hi in out)


def _fold_rows(x: np.ndarray, step: int, fold: int) -> np.ndarray:
    common = x[::step]
    return common[fold::2]


def relate_sketches(a: Sketch, b: Sketch) -> tuple[CrossRelation | None, str]:
    """The test of derivation between two sketches, or None and why it cannot run."""
    cmap = _match_coordinates(a, b)
    if cmap is None:
        return None, (f"fewer than {MIN_SHARED_TOKENS} of the sampled tokens are shared "
                      "(or one model has no token embedding): no coordinates to match")
    kinds = _common_kinds(a, b)
    if not kinds:
        return None, ("no layer tensor has the same number of rows in both models: nothing "
                      "to test the matched coordinates on")
    signed = a.signed and b.signed
    # per fold: the rows of each kind, B's layers × A's layers similarity, then the map
    folds = []
    for f in (0, 1):
        rows_a = {k: {i: _fold_rows(x, s[0], f) for i, x in a.layers[k].items()}
                  for k, s in kinds.items()}
        rows_b = {k: {j: _fold_rows(x, s[1], f) for j, x in b.layers[k].items()}
                  for k, s in kinds.items()}
        folds.append((rows_a, rows_b))
    maps = [_layer_map(*folds[f], cmap) for f in (0, 1)]
    total = NullSum()
    per_layer: dict[int, NullSum] = {}
    for f in (0, 1):
        rows_a, rows_b = folds[1 - f]  # tested on the other fold's rows
        fold_n = np.zeros((b.hidden_size, a.hidden_size))
        count = 0
        for j, i in maps[f].items():
            n_j = np.zeros_like(fold_n)
            k_j = 0
            for k in kinds:
                xa, xb = rows_a[k].get(i), rows_b[k].get(j)
                if xa is None or xb is None or xa.shape[0] == 0:
                    continue
                na, nb = float(np.linalg.norm(xa)), float(np.linalg.norm(xb))
                if na == 0 or nb == 0 or not math.isfinite(na * nb):
                    continue
                n_j += (xb.astype(np.float64).T @ xa.astype(np.float64)) / (na * nb)
                k_j += 1
            if k_j:
                per_layer.setdefault(j, NullSum()).add(_null_of(n_j, cmap, signed, k_j))
                fold_n += n_j
                count += k_j
        if count:
            total.add(_null_of(fold_n, cmap, signed, count))
    if total.tensors == 0:
        return None, "the common layer tensors are zero in one model: nothing to test on"
    log_p, z = log10_p(total, signed)
    layers = []
    for j in sorted(per_layer):
        lp, _ = log10_p(per_layer[j], signed)
        layers.append(LayerMatch(j, [maps[0].get(j, -1), maps[1].get(j, -1)], 10 ** lp, lp))
    shared = int(np.intersect1d(a.token_hashes, b.token_hashes, assume_unique=True).size)
    return CrossRelation(cmap, 10 ** log_p, log_p, z, total.cosine / total.tensors,
                         total.tensors, layers, sorted(kinds), shared,
                         (a.hidden_size, b.hidden_size), (a.n_layers, b.n_layers),
                         (a.vocab_size, b.vocab_size)), ""


def _layer_map(rows_a: dict[str, dict[int, np.ndarray]], rows_b: dict[str, dict[int, np.ndarray]],
               cmap: CoordinateMap) -> dict[int, int]:
    """Each of B's layers -> the layer of A whose rows, moved by the coordinates, agree with
    it best (summed cosines over the kinds both have)."""
    layers_a = sorted({i for by in rows_a.values() for i in by})
    layers_b = sorted({j for by in rows_b.values() for j in by})
    score = np.zeros((len(layers_b), len(layers_a)))
    pos_a = {i: n for n, i in enumerate(layers_a)}
    pos_b = {j: n for n, j in enumerate(layers_b)}
    for k in rows_a:
        ia = sorted(rows_a[k])
        jb = sorted(rows_b[k])
        if not ia or not jb or rows_a[k][ia[0]].shape[0] == 0:
            continue
        xa = np.stack([rows_a[k][i] for i in ia]).astype(np.float64)  # [La, r, dA]
        xb = np.stack([rows_b[k][j] for j in jb]).astype(np.float64)  # [Lb, r, dB]
        norm_a = np.linalg.norm(xa.reshape(len(ia), -1), axis=1)
        norm_b = np.linalg.norm(xb.reshape(len(jb), -1), axis=1)
        ma = (xa[:, :, cmap.a] * cmap.sign).reshape(len(ia), -1)
        mb = xb[:, :, cmap.b].reshape(len(jb), -1)
        s = (mb @ ma.T) / np.maximum(np.outer(norm_b, norm_a), 1e-300)
        score[np.ix_([pos_b[j] for j in jb], [pos_a[i] for i in ia])] += s
    return {j: layers_a[int(score[pos_b[j]].argmax())] for j in layers_b}


def sketch_of(model: Any, progress: Callable[[str], None] | None = None) -> Sketch:
    """The sketch of a model (opened at the boundary)."""
    from .model import open_model

    m = open_model(model).check()
    if progress is not None:
        progress(f"sketching {m.name}")
    return Sketch.of(m)
