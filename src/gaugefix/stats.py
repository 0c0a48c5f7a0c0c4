"""Streaming cross-statistics of two checkpoints' residual streams.

Both models read the same tokens; for every residual position (the input of
layer 0 and the output of every layer, all *before* the final norm) we accumulate
the co-moments of A's and B's coordinates. Memory is O(d²) whatever the number of
tokens. Each chunk is centred and multiplied in the compute dtype (float32 by
default: the GEMM is the cost), then merged into float64 accumulators with the
pairwise update of Chan et al., which is stable and exact in exact arithmetic, so
statistics of separate token shards add up to those of the whole.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import Family, detect_family, hidden_size_of
from .distributed import World, all_reduce_count, all_reduce_moments, share, world
from .errors import GaugefixError
from .io import check_regular, load_npy, no_bar, open_regular, torch_load

STATS_FORMAT = "gaugefix.stats/1"


@dataclass
class Moments:
    """Co-moments of paired samples x_A, x_B in R^d (float64)."""

    n: int
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    m2_a: torch.Tensor
    m2_b: torch.Tensor
    cross: torch.Tensor  # [d_A, d_B]: sum (x_A - mean_A)(x_B - mean_B)^T

    @classmethod
    def empty(cls, d: int) -> Moments:
        z = torch.zeros(d, dtype=torch.float64)
        return cls(0, z.clone(), z.clone(), z.clone(), z.clone(),
                   torch.zeros(d, d, dtype=torch.float64))

    @property
    def d(self) -> int:
        return int(self.mean_a.shape[0])

    @classmethod
    def of_chunk(cls, xa: torch.Tensor, xb: torch.Tensor,
                 compute_dtype: torch.dtype = torch.float32) -> Moments:
        if xa.shape != xb.shape or xa.ndim != 2:
            raise GaugefixError(f"paired chunks must be [N, d] alike: {xa.shape} vs {xb.shape}")
        xa, xb = xa.to(compute_dtype), xb.to(compute_dtype)
        ma, mb = xa.mean(0), xb.mean(0)
        ca, cb = xa - ma, xb - mb
        return cls(
            int(xa.shape[0]), ma.double().cpu(), mb.double().cpu(),
            (ca * ca).sum(0).double().cpu(), (cb * cb).sum(0).double().cpu(),
            (ca.T @ cb).double().cpu(),
        )

    def merge(self, other: Moments) -> Moments:
        """The moments of the union of both sample sets (Chan et al.)."""
        if self.d != other.d:
            raise GaugefixError(f"cannot add statistics of widths {self.d} and {other.d}")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        da, db = other.mean_a - self.mean_a, other.mean_b - self.mean_b
        w = self.n * other.n / n
        return Moments(
            n,
            self.mean_a + da * (other.n / n),
            self.mean_b + db * (other.n / n),
            self.m2_a + other.m2_a + da * da * w,
            self.m2_b + other.m2_b + db * db * w,
            self.cross + other.cross + torch.outer(da, db) * w,
        )

    __add__ = merge

    def correlation(self) -> torch.Tensor:
        """C[j, i] = corr(x_A[j], x_B[i]); 0 where a coordinate is constant."""
        sa, sb = self.m2_a.sqrt(), self.m2_b.sqrt()
        denom = torch.outer(sa, sb)
        return torch.where(denom > 0, self.cross / denom.clamp_min(1e-300), 0.0)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": getattr(self, k).contiguous()
                for k in ("mean_a", "mean_b", "m2_a", "m2_b", "cross")}

    @classmethod
    def from_tensors(cls, n: int, t: dict[str, torch.Tensor], prefix: str) -> Moments:
        names = [f"{prefix}.{k}" for k in ("mean_a", "mean_b", "m2_a", "m2_b", "cross")]
        missing = [k for k in names if k not in t]
        if missing:
            raise GaugefixError(f"statistics file lacks tensors {', '.join(missing)}")
        vecs, cross = [t[k] for k in names[:4]], t[names[4]]
        d = vecs[0].shape[0] if vecs[0].ndim == 1 else -1
        if (any(v.shape != (d,) for v in vecs) or cross.shape != (d, d) or d < 1
                or not all(v.is_floating_point() for v in [*vecs, cross])):
            raise GaugefixError(f"statistics file: {prefix} tensors have inconsistent shapes "
                                f"({[list(v.shape) for v in [*vecs, cross]]})")
        return cls(n, *(v.double() for v in vecs), cross.double())


@dataclass
class CrossStats:
    """Pooled (and optionally per-position) statistics of two residual streams."""

    pooled: Moments
    n_tokens: int
    positions: list[int]
    per_position: dict[int, Moments] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.pooled.d

    def merge(self, other: CrossStats) -> CrossStats:
        """Statistics of two disjoint token shards, added."""
        if self.positions != other.positions:
            raise GaugefixError(
                f"statistics cover different positions: {self.positions} vs {other.positions}")
        for key in ("model_a", "model_b"):
            if key in self.meta and key in other.meta and self.meta[key] != other.meta[key]:
                raise GaugefixError(f"statistics come from different {key}: "
                                    f"{self.meta[key]} vs {other.meta[key]}")
        per = {p: self.per_position[p] + other.per_position[p]
               for p in self.per_position if p in other.per_position}
        return CrossStats(self.pooled + other.pooled, self.n_tokens + other.n_tokens,
                          list(self.positions), per, dict(self.meta))

    __add__ = merge

    def check_finite(self) -> None:
        for name, m in [("pooled", self.pooled), *self.per_position.items()]:
            for t in (m.mean_a, m.mean_b, m.m2_a, m.m2_b, m.cross):
                if not torch.isfinite(t).all():
                    raise GaugefixError(
                        f"statistics ({name}) contain NaN/Inf: the models produced non-finite "
                        "activations; try --dtype float32")

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        from .io import atomic_file

        tensors = self.pooled.tensors("pooled")
        for p, m in self.per_position.items():
            tensors.update(m.tensors(f"position.{p}"))
        header = {
            "format": STATS_FORMAT,
            "n": json.dumps({"pooled": self.pooled.n,
                             **{str(p): m.n for p, m in self.per_position.items()}}),
            "n_tokens": str(self.n_tokens),
            "positions": json.dumps(self.positions),
            "meta": json.dumps(self.meta),
        }
        with atomic_file(Path(path), overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CrossStats:
        from .io import load_safetensors

        p = Path(path)
        tensors, header = load_safetensors(p, "statistics file")
        if header.get("format") != STATS_FORMAT:
            raise GaugefixError(f"{p}: not a gaugefix statistics file (format "
                                f"{header.get('format')!r}, expected {STATS_FORMAT!r})")

        def field(key: str, check: Any, rule: str) -> Any:
            try:
                value = json.loads(header[key])
            except KeyError:
                raise GaugefixError(f"{p}: statistics header lacks {key!r}") from None
            except (ValueError, RecursionError):
                raise GaugefixError(f"{p}: statistics header field {key!r} is not JSON"
                                    ) from None
            if not check(value):
                raise GaugefixError(f"{p}: statistics header field {key!r} must be {rule}")
            return value

        def count(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        counts = field("n", lambda v: isinstance(v, dict) and "pooled" in v and all(
            count(x) and (k == "pooled" or k.isdigit()) for k, x in v.items()),
            "an object of token counts with 'pooled' and position numbers")
        positions = field("positions", lambda v: isinstance(v, list) and all(
            count(x) for x in v), "a list of residual positions")
        n_tokens = field("n_tokens", count, "a token count")
        meta = field("meta", lambda v: isinstance(v, dict), "an object") if "meta" in header \
            else {}
        per = {int(k): Moments.from_tensors(v, tensors, f"position.{k}")
               for k, v in counts.items() if k != "pooled"}
        st = cls(Moments.from_tensors(counts["pooled"], tensors, "pooled"), n_tokens, positions,
                 per, meta)
        if any(m.d != st.d for m in per.values()):
            raise GaugefixError(f"{p}: per-position statistics differ in width")
        return st


# ---------------------------------------------------------------------------- taps
def resolve_positions(positions: Sequence[int] | None, n_layers: int) -> list[int]:
    """Residual positions 0..n_layers (negative ones count from the end, -1 = the last);
    anything outside -(n_layers+1)..n_layers is refused, never wrapped."""
    if positions is None:
        return list(range(n_layers + 1))
    if not positions:
        raise GaugefixError("no residual positions given")
    bad = [p for p in positions if not -(n_layers + 1) <= p <= n_layers]
    if bad:
        raise GaugefixError(f"residual positions {bad} out of range for {n_layers} layers "
                            f"(0..{n_layers}, or -{n_layers + 1}..-1 from the end)")
    return sorted({p % (n_layers + 1) for p in positions})


class ResidualTap:
    """Captures residual positions of a model: input of layer 0, output of each layer.

    These are HF's ``hidden_states[0..L-1]`` plus the last layer's output *before*
    the final norm (HF's last ``hidden_states`` entry is taken after it).
    """

    def __init__(self, model: torch.nn.Module, family: Family, positions: Sequence[int] | None):
        try:
            layers = model.get_submodule(family.layers)
        except AttributeError:
            raise GaugefixError(f"{family.name} model has no module {family.layers!r}") from None
        self.n_layers = len(layers)
        self.positions = resolve_positions(positions, self.n_layers)
        self.captured: dict[int, torch.Tensor] = {}
        self.handles = []
        if 0 in self.positions:
            self.handles.append(layers[0].register_forward_pre_hook(self._pre, with_kwargs=True))
        for p in self.positions:
            if p > 0:
                self.handles.append(layers[p - 1].register_forward_hook(self._post(p)))

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.captured[0] = args[0] if args else kwargs["hidden_states"]

    def _post(self, p: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            # decoder layers return a bare tensor in transformers 5.x, a tuple before
            self.captured[p] = output[0] if isinstance(output, tuple) else output

        return hook

    def take(self) -> dict[int, torch.Tensor]:
        out, self.captured = self.captured, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.captured = {}

    def __enter__(self) -> ResidualTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def residuals(model: torch.nn.Module, ids: torch.Tensor,
              tap: ResidualTap) -> dict[int, torch.Tensor]:
    """Run the body of the model (no LM head) and return [N, d] residuals per position."""
    body = getattr(model, "base_model", model)
    body(input_ids=ids)
    return {p: t.reshape(-1, t.shape[-1]) for p, t in tap.take().items()}


# ---------------------------------------------------------------------------- tokens
def synthetic_tokens(vocab_size: int, n_tokens: int, seed: int = 0) -> np.ndarray:
    """A Zipf-distributed token stream for models without a tokenizer or corpus."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    p = 1.0 / ranks
    p /= p.sum()
    order = rng.permutation(vocab_size)
    return order[rng.choice(vocab_size, size=n_tokens, p=p)].astype(np.int64)


TEXT_SUFFIXES = {".txt", ".md", ".text", ".jsonl", ".json", ".csv", ".tsv", ""}


def load_token_source(source: str | Path | np.ndarray | None, *, vocab_size: int,
                      n_tokens: int, tokenizer_dir: Path | None = None,
                      seed: int = 0) -> np.ndarray:
    """A 1-D token stream of at most ``n_tokens`` ids from ``source``.

    ``None`` or ``"synthetic"``: a seeded Zipf stream. A ``.npy``/``.pt`` file: token
    ids (any shape, flattened; ``.pt`` read with ``weights_only=True``). A text
    file or a directory of text files: tokenised with the model's tokenizer.

    Only what ``n_tokens`` ids need is read: id files are mapped and sliced, text is
    streamed in chunks and tokenised until there are enough ids, so a corpus of any size
    costs bounded memory. Every file must be a regular file (never ``/dev/zero``, a FIFO
    or another device).
    """
    if source is None or (isinstance(source, str) and source == "synthetic"):
        ids = synthetic_tokens(vocab_size, n_tokens, seed)
    elif isinstance(source, np.ndarray):
        ids = source.reshape(-1)
    else:
        path = Path(source)
        if not path.exists():
            raise GaugefixError(f"token source not found: {path}")
        if not path.is_dir():
            check_regular(path, "token source")
        if path.suffix == ".npy":
            ids = load_npy(path, "token ids", mmap=True).reshape(-1)
        elif path.suffix == ".pt":
            obj = torch_load(path, "token-id file", mmap=True)
            if not isinstance(obj, torch.Tensor):
                raise GaugefixError(f"{path}: expected a tensor of token ids, "
                                    f"found {type(obj).__name__}")
            ids = obj.reshape(-1)[:n_tokens].numpy()
        else:
            ids = _tokenize_text(path, tokenizer_dir, n_tokens)
    if not np.issubdtype(ids.dtype, np.integer):
        raise GaugefixError("token ids must be integers")
    ids = np.array(ids[:n_tokens], dtype=np.int64)  # a copy: never a view of a mapped file
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise GaugefixError(f"token ids must lie in 0..{vocab_size - 1} (the shared vocabulary); "
                            f"found {ids.min()}..{ids.max()}")
    return ids


TEXT_CHUNK = 1 << 16  # characters read at a time from a text token source
LINE_CAP = 1 << 20  # a longer line is tokenised in pieces cut at whitespace


def text_lines(f: Any, chunk: int = TEXT_CHUNK, cap: int = LINE_CAP) -> Iterator[str]:
    """The lines of the text stream ``f`` (as ``str.splitlines`` gives them), read ``chunk``
    characters at a time; a line longer than ``cap`` comes in pieces cut at its last
    whitespace (or at ``cap``), so no more than about ``cap + chunk`` characters are held."""
    pending = ""
    while block := f.read(chunk):
        lines = (pending + block).splitlines(keepends=True)
        pending = lines.pop()
        # ends with a line break: complete (a "\r" may be the first half of "\r\n")
        if pending.splitlines() != [pending] and not pending.endswith("\r"):
            lines.append(pending)
            pending = ""
        for line in lines:
            yield line.splitlines()[0]  # without its line break, as splitlines() gives it
        while len(pending) > cap:
            cut = max(pending.rfind(" ", 0, cap), pending.rfind("\t", 0, cap))
            cut = cut + 1 if cut > 0 else cap
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending.splitlines()[0]


def _tokenize_text(path: Path, tokenizer_dir: Path | None, n_tokens: int) -> np.ndarray:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) \
        if path.is_dir() else [path]
    if not files:
        raise GaugefixError(f"{path}: no text files found")
    if tokenizer_dir is None:
        raise GaugefixError("a text token source needs the model's tokenizer")
    tok = load_tokenizer(tokenizer_dir, why="a text token source needs it; pass "
                         "pre-tokenized ids (.npy/.pt) or use the synthetic token stream")
    out: list[int] = []
    for f in files:
        with open_regular(f, "text token source") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
            for line in text_lines(text):
                if line.strip():
                    out += tok(line, add_special_tokens=False)["input_ids"]
                    if len(out) >= n_tokens:
                        return np.asarray(out[:n_tokens])
    return np.asarray(out)


def load_tokenizer(path: Path, *, why: str) -> Any:
    """The checkpoint's tokenizer, or one error line saying why it was needed."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        raise GaugefixError(f"{path} has no usable tokenizer ({why})") from None


def token_windows(ids: np.ndarray, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive [batch, seq_len] windows covering the stream (last one may be short)."""
    t = torch.from_numpy(ids)
    n_seq = max(1, len(ids) // seq_len)
    windows = t[: n_seq * seq_len].reshape(n_seq, seq_len) if len(ids) >= seq_len else t[None]
    yield from windows.split(batch_size)


# ---------------------------------------------------------------------------- driver
def collect_stats(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    ids: np.ndarray,
    *,
    positions: Sequence[int] | None = None,
    per_position: bool = False,
    seq_len: int = 128,
    batch_size: int = 8,
    device: str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    meta: dict[str, Any] | None = None,
) -> CrossStats:
    """Accumulate the cross-statistics of ``model_a`` and ``model_b`` on token ids."""
    fam_a, fam_b = detect_family(model_a.config), detect_family(model_b.config)
    if fam_a.name != fam_b.name:
        raise GaugefixError(f"different families: {fam_a.name} vs {fam_b.name}")
    d_a, d_b = hidden_size_of(model_a.config), hidden_size_of(model_b.config)
    if d_a != d_b:
        raise GaugefixError(f"different hidden sizes: {d_a} vs {d_b}")
    tap_a, tap_b = ResidualTap(model_a, fam_a, positions), ResidualTap(model_b, fam_b, positions)
    if tap_a.positions != tap_b.positions:
        raise GaugefixError(f"different depths: {tap_a.n_layers} vs {tap_b.n_layers} layers")
    pos = tap_a.positions
    pooled, per = Moments.empty(d_a), {p: Moments.empty(d_a) for p in pos}
    n_done = 0
    w = world(device)  # under torchrun: this rank's share of the windows, reduced at the end
    windows = my_windows(ids, seq_len, w)
    bar = tqdm(total=windows.numel(), desc="statistics", unit="tok",
               disable=no_bar(progress and (w is None or w.is_main)))
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            # with a device map the layers, and so the positions, may sit on several devices
            ra, rb = ({p: t.to(device) for p, t in residuals(m, batch, tap).items()}
                      for m, tap in ((model_a, tap_a), (model_b, tap_b)))
            if per_position:
                for p in pos:
                    per[p] = per[p] + Moments.of_chunk(ra[p], rb[p], compute_dtype)
            else:
                pooled = pooled + Moments.of_chunk(torch.cat([ra[p] for p in pos]),
                                                   torch.cat([rb[p] for p in pos]), compute_dtype)
            n_done += batch.numel()
            bar.update(batch.numel())
    finally:
        bar.close()
        tap_a.remove()
        tap_b.remove()
    if device.startswith("cuda"):  # what a GPU run needs to know about its memory
        meta = {**(meta or {}), "cuda_peak_bytes": int(torch.cuda.max_memory_allocated())}
    return finish_stats(pooled, per if per_position else None, n_done, pos, meta, w, device)


def my_windows(ids: np.ndarray, seq_len: int, w: World | None) -> torch.Tensor:
    """This process's token windows: all of them, or its share under torchrun."""
    windows = next(token_windows(ids, seq_len, max(1, len(ids))))
    return windows[share(len(windows), w)]


def finish_stats(pooled: Moments, per: dict[int, Moments] | None, n_done: int,
                 positions: list[int], meta: dict[str, Any] | None, w: World | None,
                 device: str = "cpu", *, keep_per_position: bool = True) -> CrossStats:
    """The statistics of this process's windows, reduced over every rank under torchrun.
    ``per``: per-position moments (pooled here), else ``pooled`` is already pooled."""
    if w is not None:
        if per is not None:
            per = {p: all_reduce_moments(m, device) for p, m in per.items()}
        else:
            pooled = all_reduce_moments(pooled, device)
        n_done = all_reduce_count(n_done, device)
    if per is not None:
        pooled = Moments.empty(pooled.d)
        for p in positions:
            pooled = pooled + per[p]
    stats = CrossStats(pooled, n_done, positions, (per or {}) if keep_per_position else {},
                       {**(meta or {}), **({"world_size": w.size} if w else {})})
    stats.check_finite()
    return stats


def sum_stats(stats: Iterable[CrossStats]) -> CrossStats:
    items = list(stats)
    if not items:
        raise GaugefixError("no statistics given")
    total = items[0]
    for s in items[1:]:
        total = total + s
    return total
