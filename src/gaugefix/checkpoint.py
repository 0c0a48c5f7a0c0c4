"""Reading HF checkpoints: resolve a directory or hub id, find its weight files.

Only safetensors and ``weights_only`` torch files are read; nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .arch import Family, detect_family, hidden_size_of
from .errors import GaugefixError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def resolve_model_dir(model: str | Path) -> Path:
    """A local checkpoint directory, downloading a hub id when the user has the network."""
    p = Path(model)
    if p.is_dir():
        return p
    if p.exists():
        raise GaugefixError(f"{model} is a file; expected a checkpoint directory")
    text = str(model)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
        except Exception as exc:
            raise GaugefixError(f"{model}: not a local directory, and fetching it from the hub "
                                f"failed ({type(exc).__name__}: {exc})") from None
    raise GaugefixError(f"checkpoint directory not found: {model}")


@dataclass
class Checkpoint:
    """A HF causal-LM checkpoint directory: config, family, weight shards."""

    path: Path
    config: dict[str, Any]
    family: Family
    hidden_size: int
    shards: list[Path]
    index_file: Path | None

    @classmethod
    def open(cls, model: str | Path) -> Checkpoint:
        path = resolve_model_dir(model)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise GaugefixError(f"{path}: no config.json (not a HF checkpoint directory)")
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise GaugefixError(f"{cfg_file}: not valid JSON ({exc})") from None
        family = detect_family(config)
        shards, index_file = _weight_files(path)
        return cls(path, config, family, hidden_size_of(config), shards, index_file)

    @property
    def is_safetensors(self) -> bool:
        return self.shards[0].suffix == ".safetensors"

    @property
    def weight_files(self) -> set[str]:
        names = {s.name for s in self.shards}
        if self.index_file is not None:
            names.add(self.index_file.name)
        return names

    def entries(self) -> Iterator[tuple[Path, str, tuple[int, ...]]]:
        """(shard, key, shape) of every tensor, reading headers only where possible."""
        for shard in self.shards:
            if self.is_safetensors:
                from safetensors import safe_open

                with safe_open(shard, "pt") as f:
                    for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                        yield shard, k, tuple(f.get_slice(k).get_shape())
            else:
                for k, t in load_shard(shard).items():
                    yield shard, k, tuple(t.shape)

    def shard_of(self) -> dict[str, Path]:
        return {k: shard for shard, k, _ in self.entries()}

    def iter_tensors(self, keys: set[str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) pairs, shard by shard; only ``keys`` are read when given."""
        for shard in self.shards:
            if self.is_safetensors:
                from safetensors import safe_open

                with safe_open(shard, "pt") as f:
                    for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                        if keys is None or k in keys:
                            yield k, f.get_tensor(k)
            else:
                for k, t in load_shard(shard).items():
                    if keys is None or k in keys:
                        yield k, t

    def getter(self) -> Callable[[str], torch.Tensor]:
        """A function that reads one tensor by key (lazily; shard files opened once)."""
        if not self.is_safetensors:
            return self.tensors().__getitem__
        from safetensors import safe_open

        where = self.shard_of()
        handles: dict[Path, Any] = {}

        def get(key: str) -> torch.Tensor:
            if key not in where:
                raise GaugefixError(f"{self.path} has no tensor {key!r}")
            if where[key] not in handles:
                handles[where[key]] = safe_open(str(where[key]), "pt")
            return handles[where[key]].get_tensor(key)

        return get

    def tensors(self, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Load the named tensors (all if ``keys`` is None)."""
        return dict(self.iter_tensors(keys))


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One weight shard as a dict; torch files strictly with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GaugefixError(
            f"{path}: cannot be read as a weights-only torch file ({exc})"
        ) from None
    if not isinstance(sd, dict):
        raise GaugefixError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def _weight_files(path: Path) -> tuple[list[Path], Path | None]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise GaugefixError(f"{index}: malformed shard index ({exc})") from None
            shards = [path / s for s in dict.fromkeys(weight_map.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise GaugefixError(f"{index} names missing shards: {', '.join(missing)}")
            return shards, index
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (path / single).is_file():
            return [path / single], None
    raise GaugefixError(
        f"{path}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
        f"or {BIN_INDEX})"
    )
