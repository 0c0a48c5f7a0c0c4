"""Reading HF checkpoints: resolve a directory or hub id, find its weight files.

Only safetensors and ``weights_only`` torch files are read; nothing is unpickled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arch import Family, detect_family, hidden_size_of
from .errors import GaugefixError
from .io import (
    check_regular,
    load_safetensors,
    note_input,
    open_safetensors,
    read_json,
    torch_load,
)

if TYPE_CHECKING:
    import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_SHARD_NAME = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def resolve_model_dir(model: str | Path) -> Path:
    """A local checkpoint directory, or a hub id: from the local Hugging Face cache, or
    downloaded when the user has the network (with ``HF_HUB_OFFLINE=1``, the cache only)."""
    p = Path(model)
    if p.is_dir():
        note_input(p)
        return p
    if p.exists():
        from .quant.gguf_file import is_gguf

        check_regular(p, "model file")  # a FIFO or a device: refused, never opened
        if is_gguf(p):  # a caller that reads checkpoint directories only
            raise GaugefixError(f"{model} is a GGUF file; a Hugging Face checkpoint directory "
                                "is needed here")
        raise GaugefixError(f"{model} is a file but not a GGUF file (no GGUF magic); a model "
                            "is a checkpoint directory, a .gguf file or a hub id")
    text = str(model)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        snapshot = _hub_snapshot(text)
        note_input(snapshot)
        return snapshot
    raise GaugefixError(f"checkpoint directory not found: {model}")


def _hub_snapshot(repo_id: str) -> Path:
    """The snapshot directory of ``repo_id`` (default branch) in the HF cache, fetched first
    unless the hub is off (``HF_HUB_OFFLINE``); every failure is one clear GaugefixError."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, OSError, ValueError) as exc:  # offline, not found, bad id
        first = str(exc).strip().split("\n", 1)[0]
        if offline and type(exc) is LocalEntryNotFoundError:  # not an incomplete snapshot
            raise GaugefixError(
                f"{repo_id}: not a local directory, and not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); offline mode is on (HF_HUB_OFFLINE), so it was not "
                "downloaded (download it once with network access, or unset HF_HUB_OFFLINE)"
            ) from None
        raise GaugefixError(f"{repo_id}: not a local directory, and fetching it from the hub "
                            f"failed ({type(exc).__name__}: {first})") from None


@dataclass
class Checkpoint:
    """A HF causal-LM checkpoint directory: config, family, weight shards."""

    path: Path
    config: dict[str, Any]
    family: Family
    hidden_size: int
    shards: list[Path]
    index_file: Path | None
    # weight files of the other layout (pytorch_model*.bin beside safetensors, or the
    # reverse): never read, never copied into an output (they would be another chart)
    other_layout: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, model: str | Path) -> Checkpoint:
        path = resolve_model_dir(model)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise GaugefixError(f"{path}: no config.json and no .gguf file (neither a Hugging "
                                "Face checkpoint directory nor a folder holding a GGUF file)")
        config = read_json(cfg_file, "model config")
        family = detect_family(config)
        shards, index_file = _weight_files(path)
        ours = {p.name for p in shards} | ({index_file.name} if index_file else set())
        other = sorted(p for p in path.iterdir() if p.is_file() and p.name not in ours and (
            p.name in (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE)
            or _SHARD_NAME.match(p.name)))
        return cls(path, config, family, hidden_size_of(config), shards, index_file, other)

    @property
    def is_safetensors(self) -> bool:
        return self.shards[0].suffix == ".safetensors"

    @property
    def weight_files(self) -> set[str]:
        """Every weight file's name (both layouts): what an output must not copy as is."""
        names = {s.name for s in self.shards} | {p.name for p in self.other_layout}
        if self.index_file is not None:
            names.add(self.index_file.name)
        return names

    def entries(self) -> Iterator[tuple[Path, str, tuple[int, ...]]]:
        """(shard, key, shape) of every tensor, reading headers only where possible."""
        for shard in self.shards:
            if self.is_safetensors:
                with open_safetensors(shard, "weight shard", framework="numpy") as f:
                    for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                        yield shard, k, tuple(f.get_slice(k).get_shape())
            else:
                for k, t in load_shard(shard).items():
                    yield shard, k, tuple(t.shape)

    def iter_tensors(self, keys: set[str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) pairs, shard by shard; only ``keys`` are read when given."""
        for shard in self.shards:
            if self.is_safetensors:
                with open_safetensors(shard, "weight shard") as f:
                    for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                        if keys is None or k in keys:
                            yield k, f.get_tensor(k)
            else:
                for k, t in load_shard(shard).items():
                    if keys is None or k in keys:
                        yield k, t

    def tensors(self, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Load the named tensors (all if ``keys`` is None)."""
        return dict(self.iter_tensors(keys))


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One weight shard as a dict; torch files strictly with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        return load_safetensors(path, "weight shard")[0]
    sd = torch_load(path, "weight shard")
    import torch

    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise GaugefixError(f"{path}: expected a state dict of tensors, found "
                            f"{type(sd).__name__}")
    return sd


def _weight_files(path: Path) -> tuple[list[Path], Path | None]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()):
                raise GaugefixError(f"{index}: malformed shard index (weight_map must map "
                                    "tensor names to shard file names in the same directory)")
            shards = [path / s for s in dict.fromkeys(weight_map.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise GaugefixError(f"{index} names missing shards: {', '.join(missing)}")
            return shards, index
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (path / single).is_file():
            return [path / single], None
    for name in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX):
        if os.path.lexists(path / name):  # there, but not a file: say what it is
            check_regular(path / name, "weight file")
    raise GaugefixError(
        f"{path}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
        f"or {BIN_INDEX})"
    )
