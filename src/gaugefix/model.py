"""The opened model: every model a command reads is opened once, as a :class:`Model`.

A :class:`Model` is made from what a user names — a checkpoint directory, a hub id (the local
Hugging Face cache, or a download), or a model already in memory — and knows what every job
asks of it: its family, width, layers, vocabulary and positions, the shape of every tensor,
slices of any tensor read lazily, its identity (the content hash of its weight files, computed
at most once), and the ``torch`` module itself, loaded at most once per dtype and device.
The config is checked against the tensors when the model is opened for work
(:meth:`Model.check`), so that no job runs on a checkpoint whose config contradicts it.

Library functions take a :data:`ModelLike` and open it at their boundary with
:func:`open_model`, which returns a :class:`Model` unchanged: a caller that holds a model
(the CLI, a notebook) opens each input once and passes it on.
"""

from __future__ import annotations

import contextlib
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .arch import Family, Op, check_width, detect_family, hidden_size_of
from .checkpoint import Checkpoint
from .errors import GaugefixError
from .loading import load_causal_lm

if TYPE_CHECKING:
    import torch

    from .quant.gguf_file import GgufFile
    from .quant.hf_checkpoint import HfQuant

# what every library function accepts as a model (opened at its boundary by open_model)
ModelLike = Union[str, Path, "Model", "torch.nn.Module"]

DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")
# the largest number of layers or positions a config may declare (beyond: a forged config)
MAX_DECLARED = 1 << 24


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (one of :data:`DTYPE_NAMES`), or one error line."""
    import torch

    if name not in DTYPE_NAMES:
        raise GaugefixError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")


class Model:
    """One opened input model (see the module docstring). Build it with :func:`open_model`."""

    def __init__(self, name: str, *, checkpoint: Checkpoint | None = None,
                 module: torch.nn.Module | None = None, gguf: GgufFile | None = None) -> None:
        if sum(x is not None for x in (checkpoint, module, gguf)) != 1:
            raise TypeError("a Model is a checkpoint, a GGUF file or a module")
        self.name = name
        self.checkpoint = checkpoint
        self.gguf = gguf
        self._module = module
        self._loaded: dict[tuple[str, str, str | None], torch.nn.Module] = {}
        self._identity: dict[str, str] | None = None
        # what is computed from the weights at most once per opened model (its fingerprint):
        # an opened model's weights are taken not to change while it is open
        self.memo: dict[Any, Any] = {}
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()
        self._checked = False
        if checkpoint is not None:
            self.config: dict[str, Any] = checkpoint.config
            self.family: Family = checkpoint.family
            self.hidden_size: int = checkpoint.hidden_size
        elif gguf is not None:
            self.config = gguf.config
            self.family = detect_family(self.config)
            self.hidden_size = hidden_size_of(self.config)
        else:
            config = module.config  # type: ignore[union-attr]
            self.config = config.to_dict()
            self.family = detect_family(config)
            self.hidden_size = hidden_size_of(config)

    # ------------------------------------------------------------------ what it is
    @property
    def path(self) -> Path | None:
        """The checkpoint directory or GGUF file (None for a model in memory)."""
        if self.gguf is not None:
            return self.gguf.path
        return None if self.checkpoint is None else self.checkpoint.path

    @property
    def in_memory(self) -> bool:
        return self.checkpoint is None and self.gguf is None

    @property
    def quantised(self) -> dict[str, int]:
        """Tensors per quantised type ({} for a float model): GGML types, or the HF scheme
        (its :data:`gaugefix.quant.hf.CAPABILITIES` row) with its count of Linears."""
        if self.gguf is not None:
            return self.gguf.quantised
        q = self._quant
        return {} if q is None else {q.name: len(q.groups)}

    def __repr__(self) -> str:
        return f"Model({self.name!r}, {self.family.name}, d={self.hidden_size})"

    def _config_int(self, *keys: str, required: bool = True) -> int | None:
        for cfg in (self.config, self.config.get("text_config") or {}):
            for key in keys:
                value = cfg.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        if not required:
            return None
        raise GaugefixError(f"{self.name}: config has no positive integer {' / '.join(keys)}")

    @property
    def n_layers(self) -> int:
        """Decoder layers: residual positions are 0..n_layers."""
        return self._config_int("num_hidden_layers", "n_layer", "num_layers")  # type: ignore

    @property
    def vocab_size(self) -> int:
        return self._config_int("vocab_size")  # type: ignore[return-value]

    @property
    def max_positions(self) -> int | None:
        """The most positions one sequence may have (None: the config sets no limit)."""
        return self._config_int("max_position_embeddings", "n_positions", "n_ctx",
                                "max_sequence_length", "seq_length", required=False)

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.path if self.gguf is None else None

    # ------------------------------------------------------------------ tensors
    @cached_property
    def _where(self) -> dict[str, tuple[Path | None, tuple[int, ...]]]:
        if self.gguf is not None:
            return {k: (self.gguf.path, s) for k, s in self.gguf.shapes.items()}
        if self.checkpoint is None:
            return {k: (None, tuple(v.shape)) for k, v in self._state_dict.items()}
        q = self._quant
        if q is None:
            return self._stored_where
        return self._logical_where(q)

    # ---------------------------------------------- a HF quantised checkpoint (quant.hf)
    @cached_property
    def _stored_where(self) -> dict[str, tuple[Path | None, tuple[int, ...]]]:
        """Every stored tensor of a checkpoint: its shard and shape."""
        assert self.checkpoint is not None
        return {k: (shard, shape) for shard, k, shape in self.checkpoint.entries()}

    @cached_property
    def _quant(self) -> HfQuant | None:
        """The scheme and Linear groups of a checkpoint whose config.json has a
        ``quantization_config`` (None otherwise; an unsupported one: one error line)."""
        if self.checkpoint is None or not self.config.get("quantization_config"):
            return None
        from .quant.hf_checkpoint import detect

        if not self.checkpoint.is_safetensors:
            raise GaugefixError(f"{self.name}: a quantised checkpoint is read from safetensors "
                                "shards only")
        return detect(self.config, {k: v[1] for k, v in self._stored_where.items()},
                      self._stored_dtypes, self.stored_tensor)

    def _stored_dtypes(self) -> dict[str, str]:
        """Every stored tensor's safetensors dtype name (headers only)."""
        from .io import open_safetensors

        assert self.checkpoint is not None
        out: dict[str, str] = {}
        for shard in self.checkpoint.shards:
            with open_safetensors(shard, "weight shard", framework="numpy") as f:
                for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    out[k] = str(f.get_slice(k).get_dtype())
        return out

    @property
    def hf_quant(self) -> HfQuant | None:
        """A checkpoint in a HF quantised format: its scheme and groups (None otherwise)."""
        return self._quant

    def _logical_where(self, q: HfQuant) -> dict[str, tuple[Path | None, tuple[int, ...]]]:
        """Each quantised group as one logical ``<module>.weight`` of its dequantised
        [out, in] shape (shard: None), every other tensor as stored."""
        from .quant import hf

        stored = q.stored
        out: dict[str, tuple[Path | None, tuple[int, ...]]] = {}
        for k, where in self._stored_where.items():
            key = stored.get(k)
            if key is None:
                out[k] = where
            elif key not in out:
                shapes = {n: self._stored_where[n][1] for n in q.groups[key].values()}
                out[key] = (None, hf.logical_shape(q.scheme, shapes))
        return out

    def stored_tensor(self, name: str) -> torch.Tensor:
        """One stored tensor of a checkpoint, by its stored name (shards opened once)."""
        shard = self._stored_where[name][0]
        assert shard is not None and self.checkpoint is not None
        if not self.checkpoint.is_safetensors:
            return self._torch_shard(shard)[name]
        if shard not in self._handles:
            from .io import open_safetensors

            self._handles[shard] = self._stack.enter_context(
                open_safetensors(shard, "weight shard"))
        return self._handles[shard].get_tensor(name)

    def _dequantised(self, key: str) -> torch.Tensor | None:
        """A quantised group's float32 [out, in] weight (None: ``key`` is no group); the
        last one is kept, as slices of one tensor come one after another."""
        q = self._quant
        if q is None or key not in q.groups:
            return None
        cache = self.__dict__.setdefault("_deq_cache", {})
        if cache.get("key") != key:
            from .quant import hf
            from .quant.hf_checkpoint import group_of

            cache.update(key=key, value=hf.dequantise(q.scheme, group_of(self, key)))
        return cache["value"]

    @cached_property
    def _state_dict(self) -> dict[str, torch.Tensor]:
        assert self._module is not None
        return {k: v.detach() for k, v in self._module.state_dict().items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape (safetensors: read from the headers alone)."""
        return {k: shape for k, (_, shape) in self._where.items()}

    @cached_property
    def plan(self) -> dict[str, Op]:
        """Every tensor's op under the family's rules (unmatched tensors: one error)."""
        return self.family.plan(self.shapes)

    def slice(self, key: str, idx: tuple[slice, ...]) -> torch.Tensor:
        """``tensor[idx]``, reading only the slice's bytes where the format allows."""
        if key not in self._where:
            raise GaugefixError(f"{self.name} has no tensor {key!r}")
        if self.gguf is not None:  # dequantised whole (the last tensor is kept)
            return self.gguf.tensor(key)[idx]
        if self.checkpoint is None:
            return self._state_dict[key][idx]
        if (deq := self._dequantised(key)) is not None:
            return deq[idx]
        shard = self._where[key][0]
        assert shard is not None
        if not self.checkpoint.is_safetensors:
            return self._torch_shard(shard)[key][idx]
        if shard not in self._handles:
            from .io import open_safetensors

            self._handles[shard] = self._stack.enter_context(
                open_safetensors(shard, "weight shard"))
        return self._handles[shard].get_slice(key)[idx]

    def tensor(self, key: str) -> torch.Tensor:
        """One whole tensor (lazily: shard files opened once)."""
        if key not in self._where:
            raise GaugefixError(f"{self.name} has no tensor {key!r}")
        if self.gguf is not None:
            return self.gguf.tensor(key)
        if self.checkpoint is None:
            return self._state_dict[key]
        if (deq := self._dequantised(key)) is not None:
            return deq
        shard = self._where[key][0]
        assert shard is not None
        if not self.checkpoint.is_safetensors:
            return self._torch_shard(shard)[key]
        self.slice(key, ())  # opens the shard
        return self._handles[shard].get_tensor(key)

    def _torch_shard(self, shard: Path) -> dict[str, torch.Tensor]:
        if shard not in self._handles:
            from .checkpoint import load_shard

            self._handles[shard] = load_shard(shard)
        return self._handles[shard]

    def close(self) -> None:
        """Close the open weight files (the model stays usable: they reopen on demand)."""
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._handles.clear()

    # ------------------------------------------------------------------ checks
    def check(self) -> Model:
        """Refuse a config that contradicts the tensors, every contradiction in one error: a
        residual width other than the config's, layers it declares without tensors. Done once
        per model, before any work. (Any other tensor the config needs and the files lack,
        such as an untied head, is refused when the module is loaded: :func:`load_causal_lm`.)
        """
        if self._checked or self.in_memory:
            return self
        problems: list[str] = []
        d = self.hidden_size
        if not 0 < d <= MAX_DECLARED:
            problems.append(f"hidden size {d} is not a width (1..{MAX_DECLARED})")
        shapes = self.shapes
        plan = self.plan
        for key, op in plan.items():
            try:
                check_width(key, shapes[key], (op,), d)
            except GaugefixError as exc:
                problems.append(str(exc))
                if len(problems) >= 4:
                    break
        n = self._config_int("num_hidden_layers", "n_layer", "num_layers", required=False)
        if n is not None and n > MAX_DECLARED:
            problems.append(f"{n} layers declared (more than {MAX_DECLARED})")
        elif n is not None:  # layers beyond n may be extra heads (DeepSeek's MTP layer)
            present = {int(m[1]) for k in shapes
                       if not self.family.in_tower(k) and (m := _LAYER.search(k))}
            missing = sorted(set(range(n)) - present) if present else []
            if missing:
                problems.append(f"config declares {n} layers but the weights have none for "
                                f"layer{'s' if len(missing) > 1 else ''} {_ranges(missing)}")
        if problems:
            what = "metadata" if self.gguf is not None else "config.json"
            raise GaugefixError(f"{self.name}: its {what} contradicts its tensors: "
                                + "; ".join(problems))
        self._checked = True
        return self

    # ------------------------------------------------------------------ identity
    def identity(self, blake3: str | None = None) -> dict[str, str]:
        """Name and content hash of the weights (BLAKE3 of the weight files in shard order,
        :func:`gaugefix.io.blake3_files`), computed once; ``blake3`` when the caller already
        hashed them on the way."""
        if self.in_memory:
            return {"name": self.name}
        if blake3 is not None:
            self._identity = {"name": self.name, "blake3": blake3}
        if self._identity is None:
            from .io import blake3_files

            files = [self.gguf.path] if self.gguf is not None else self.checkpoint.shards
            self._identity = {"name": self.name, "blake3": blake3_files(files)}
        return self._identity

    # ------------------------------------------------------------------ the module
    def load(self, dtype: str = "float32", device: str = "cpu",
             device_map: str | None = None) -> torch.nn.Module:
        """The ``transformers`` model, loaded once per (dtype, device, device map)."""
        if self._module is not None:
            return self._module
        key = (dtype, device, device_map)
        if key not in self._loaded:
            self.check()
            path = self.path
            assert path is not None
            if self.gguf is not None:  # transformers dequantises it
                options = {} if device_map is None else {"device_map": device_map}
                model = self.gguf.load(torch_dtype(dtype), **options)
                self._loaded[key] = model if device_map is not None else model.to(device)
            elif self._quant is not None:  # transformers' quantised loading
                from .quant.hf_checkpoint import load

                options = {} if device_map is None else {"device_map": device_map}
                model = load(self, torch_dtype(dtype), **options)
                if device_map is None:
                    model = model.to(device)
            elif device_map is not None:  # accelerate places the layers
                model = load_causal_lm(path, torch_dtype(dtype), device_map=device_map)
            else:
                model = load_causal_lm(path, torch_dtype(dtype)).to(device)
            self._loaded[key] = model
        return self._loaded[key]

    def unload(self) -> None:
        """Drop the loaded modules (a model in memory stays: it is the caller's)."""
        self._loaded.clear()


def _ranges(items: list[int], n: int = 6) -> str:
    runs: list[str] = []
    start = prev = items[0]
    for i in [*items[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}–{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(runs[:n]) + (" ..." if len(runs) > n else "")


def open_model(ref: ModelLike) -> Model:
    """A :class:`Model` for ``ref``: a checkpoint directory, a hub id, a loaded
    ``transformers`` model, or a :class:`Model` (returned as it is)."""
    if isinstance(ref, Model):
        return ref
    if isinstance(ref, str | Path):
        from .quant.gguf_file import GgufFile, find_gguf

        found = find_gguf(Path(ref))
        if found is not None:
            return Model(str(ref), gguf=GgufFile.open(found))
        return Model(str(ref), checkpoint=Checkpoint.open(ref))
    import torch

    if isinstance(ref, torch.nn.Module):
        if getattr(ref, "config", None) is None:
            raise GaugefixError(f"{type(ref).__name__} has no .config (not a transformers "
                                "model)")
        return Model(type(ref).__name__, module=ref)
    raise GaugefixError(f"not a model: {type(ref).__name__} (give a checkpoint directory, a "
                        "hub id or a transformers model)")


def check_pair(a: Model, b: Model) -> tuple[Family, int]:
    """Refuse two models of different families or widths; their family and width."""
    if a.family.name != b.family.name:
        raise GaugefixError(f"different families: {a.name} is {a.family.name}, {b.name} is "
                            f"{b.family.name}")
    if a.hidden_size != b.hidden_size:
        raise GaugefixError(f"different hidden sizes: {a.name} has d={a.hidden_size}, "
                            f"{b.name} has d={b.hidden_size}")
    return a.family, a.hidden_size
