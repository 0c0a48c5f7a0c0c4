"""Residual statistics of checkpoints larger than memory: layer by layer, A and B in lockstep.

Both models are opened with transformers' own big-model loading: every decoder layer stays
on disk (in its safetensors files) and accelerate's hooks bring a layer's weights in for its
forward and drop them after; the embedding and other small modules stay in memory. A group
of token windows then flows through the two models together, as quantisers' sequential
calibration does: the model's own forward runs once per batch with every decoder layer
replaced by a pass-through recorder, which captures what each layer receives (the hidden
states entering layer 0, the attention masks, the rotary embeddings); then for each layer l,
A's layer l and B's layer l run on the group's hidden states, the co-moments at residual
position l + 1 are accumulated, and the previous hidden states are dropped. No forward pass
is re-implemented: the embedding, the masks and rotary embeddings, and every layer are
transformers' own modules.

Memory: the resident modules of both models, two decoder layers at a time, the hidden
states of one token group for both models, and the d×d accumulators. The group is as large
as the budget allows (every layer is read once per group).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arch import Family
from .distributed import world
from .errors import GaugefixError
from .model import Model
from .stats import CrossStats, Moments, finish_stats, my_windows, resolve_positions

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'200MB', '4GB', '1.5GiB', '512' (bytes) -> bytes."""
    m = _SIZE.match(str(text))
    if m is None or m[2].lower() not in _UNITS:
        raise GaugefixError(f"memory size {text!r} is not a size like 200MB, 4GB or 1.5GiB")
    value = float(m[1]) * _UNITS[m[2].lower()]
    if value < 1:
        raise GaugefixError(f"memory size {text!r} must be positive")
    return int(value)


def bound_malloc() -> None:
    """Make glibc hand freed large blocks back to the system. Each offloaded layer is
    allocated anew at every call; by default glibc raises its mmap threshold after the first
    such block is freed and serves the next ones from a heap it keeps, so the process would
    grow well past the budget. A fixed 1 MiB threshold (and trim threshold) stops that. A
    process-wide setting, made only for budgeted runs; no effect outside glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)


def _fmt(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer during one forward: records what the layer receives
    and passes its hidden states through unchanged. Attributes the model reads off its layers
    (``attention_type``, ...) are the real layer's."""

    def __init__(self, layer: torch.nn.Module, index: int, store: dict[int, Any]) -> None:
        super().__init__()
        self.__dict__["_layer"] = layer
        self.__dict__["_index"] = index
        self.__dict__["_store"] = store

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._store[self._index] = (args[1:], kwargs, hidden)
        return hidden


@dataclass
class _Offloaded:
    model: torch.nn.Module
    body: torch.nn.Module
    layers: torch.nn.ModuleList
    layer_bytes: list[int]
    resident_bytes: int

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, Any]]:
        store: dict[int, Any] = {}
        real = list(self.layers)
        for i, layer in enumerate(real):
            self.layers[i] = _Recorder(layer, i, store)
        try:
            yield store
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer


def _module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * (item if p.is_floating_point() else p.element_size())
               for p in module.parameters())


def _device_map(model: torch.nn.Module, layers_path: str) -> dict[str, str]:
    """Decoder layers on disk, the LM head on disk (never run), everything else in memory."""
    dm: dict[str, str] = {}

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full == layers_path:
                dm.update({f"{full}.{i}": "disk" for i in range(len(child))})
            elif layers_path.startswith(full + "."):
                walk(child, full + ".")
            else:
                dm[full] = "disk" if child is model.get_output_embeddings() else "cpu"

    walk(model, "")
    return dm


def open_offloaded(ckpt: Model, dtype: torch.dtype, offload_dir: Path) -> _Offloaded:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import load_causal_lm

    config = AutoConfig.from_pretrained(ckpt.path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fam: Family = ckpt.family
    layer_sizes = [_module_bytes(m, dtype) for m in skeleton.get_submodule(fam.layers)]
    head = skeleton.get_output_embeddings()
    resident = _module_bytes(skeleton, dtype) - sum(layer_sizes) - (
        _module_bytes(head, dtype) if head is not None else 0)
    tied = head is not None and head.weight is skeleton.get_input_embeddings().weight
    if tied:  # the head's weight is the embedding, which stays in memory
        resident += _module_bytes(head, dtype)
    model = load_causal_lm(ckpt.path, dtype, device_map=_device_map(skeleton, fam.layers),
                           offload_folder=str(offload_dir))
    return _Offloaded(model, getattr(model, "base_model", model),
                      model.get_submodule(fam.layers), layer_sizes, resident)


def plan_groups(n_windows: int, seq_len: int, batch_size: int, d: int, budget: int,
                a: _Offloaded, b: _Offloaded, intermediate: int, heads: int,
                names: tuple[str, str]) -> int:
    """How many token windows fit in one group under ``budget``; refuses a budget that
    cannot hold the resident modules, the largest pair of layers and one batch.

    Held for the whole group: both models' hidden states (float32). Transient, for one batch
    inside one layer: attention projections and scores, the MLP's hidden activations."""
    fixed = a.resident_bytes + b.resident_bytes
    biggest = max(range(len(a.layer_bytes)), key=lambda i: a.layer_bytes[i] + b.layer_bytes[i])
    # twice: a layer read from disk in the file's dtype is converted to the compute dtype,
    # and both copies exist for a moment
    layers = 2 * (a.layer_bytes[biggest] + b.layer_bytes[biggest])
    stats = 4 * 8 * d * d  # float64 cross moments, pooled and per chunk
    held = 2 * 2 * seq_len * d * 4  # A's and B's hidden states, in and out of a layer
    batch = batch_size * (seq_len * 4 * (6 * d + 3 * intermediate) + 4 * heads * seq_len ** 2)
    need = fixed + layers + stats + batch + batch_size * held
    if need > budget:
        raise GaugefixError(
            f"--max-memory {_fmt(budget)} is too small: decoder layer {biggest} takes "
            f"{_fmt(a.layer_bytes[biggest])} in {names[0]} and {_fmt(b.layer_bytes[biggest])} "
            f"in {names[1]}, the modules kept in memory {_fmt(fixed)}, the statistics "
            f"{_fmt(stats)}, one batch's activations {_fmt(batch + batch_size * held)}; needs "
            f"at least {_fmt(need)} (or a smaller --batch-size)")
    return max(batch_size, min(n_windows, (budget - fixed - layers - stats - batch) // held))


def collect_stats_layerwise(ckpt_a: Model, ckpt_b: Model, ids: np.ndarray, *,
                            budget: int, positions: Sequence[int] | None = None,
                            per_position: bool = False, seq_len: int = 128,
                            batch_size: int = 8, dtype: torch.dtype = torch.float32,
                            compute_dtype: torch.dtype = torch.float32,
                            meta: dict[str, Any] | None = None) -> CrossStats:
    """The statistics :func:`gaugefix.stats.collect_stats` computes, within ``budget`` bytes
    (see the module docstring); equal to the in-memory ones to float rounding."""
    d = ckpt_a.hidden_size
    pos = resolve_positions(positions, ckpt_a.n_layers)
    bound_malloc()
    w = world()
    windows = my_windows(ids, seq_len, w)
    with tempfile.TemporaryDirectory(prefix="gaugefix-offload-") as off:
        a = open_offloaded(ckpt_a, dtype, Path(off) / "a")
        b = open_offloaded(ckpt_b, dtype, Path(off) / "b")
        cfg = a.model.config
        inter = int(getattr(cfg, "intermediate_size", None) or 4 * d)
        heads = int(getattr(cfg, "num_attention_heads", None) or 1)
        group = plan_groups(len(windows), windows.shape[1], batch_size, d, budget, a, b,
                            inter, heads, (str(ckpt_a.path), str(ckpt_b.path)))
        group -= group % batch_size  # the in-memory run's batches, so its very products
        per: dict[int, Moments] = {p: Moments.empty(d) for p in pos}
        with torch.no_grad():
            for g0 in range(0, len(windows), group):
                batches = windows[g0:g0 + group].split(batch_size)
                _run_group(a, b, batches, pos, per, compute_dtype)
    return finish_stats(Moments.empty(d), per, int(windows.numel()), pos,
                        {**(meta or {}), "max_memory": budget}, w,
                        keep_per_position=per_position)


def _run_group(a: _Offloaded, b: _Offloaded, batches: Sequence[torch.Tensor],
               pos: list[int], per: dict[int, Moments], compute_dtype: torch.dtype) -> None:
    """One group of windows through both models, layer by layer."""
    calls: list[tuple[dict[int, Any], dict[int, Any]]] = []
    for batch in batches:  # what every layer receives, from each model's own forward
        recorded = []
        for m in (a, b):
            with m.recording() as store:
                m.body(input_ids=batch, use_cache=False)
            recorded.append(store)
        calls.append((recorded[0], recorded[1]))
    hidden = [(ra[0][2], rb[0][2]) for ra, rb in calls]
    last = max(pos)
    for layer in range(last + 1):
        if layer in pos:
            for ha, hb in hidden:
                per[layer] = per[layer] + Moments.of_chunk(ha.reshape(-1, ha.shape[-1]),
                                                           hb.reshape(-1, hb.shape[-1]),
                                                           compute_dtype)
        if layer == last:
            break
        for m, side in ((a, 0), (b, 1)):
            fn = m.layers[layer]
            hidden = [tuple(h if k != side else _call(fn, h, calls[n][side][layer])
                            for k, h in enumerate(pair)) for n, pair in enumerate(hidden)]


def _call(layer: torch.nn.Module, hidden: torch.Tensor, recorded: tuple) -> torch.Tensor:
    args, kwargs, _ = recorded
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out
