"""The one streaming engine (#18.3): :func:`gaugefix.shards.stream` hands every block of a
safetensors file, moved or not, to a pluggable sink; apply (write), fingerprints (digest) and
merge (merge with a second input) are sinks of it, and no other module reaches into its
private names."""

from __future__ import annotations

import ast
import errno
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import gaugefix
import gaugefix.shards as shards
from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm


class Collect(shards.Sink):
    """Every block and its output bytes, as the engine hands them over."""

    def __init__(self) -> None:
        self.blocks: list[shards.Block] = []
        self.data = bytearray()
        self.closed: bool | None = None
        self.released: list[tuple[int, int]] = []

    def take(self, block, src, out):
        self.blocks.append(block)
        self.data += bytes(out)
        return []

    def release(self, begin, end):
        self.released.append((begin, end))

    def close(self, ok):
        self.closed = ok


def _file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    t = {"w": torch.randn(300, 64), "e": torch.randn(64, 40).to(torch.bfloat16),
         "ids": torch.arange(33, dtype=torch.int64), "empty": torch.zeros(0, 64)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    return tmp_path / "x.safetensors", t


@pytest.mark.parametrize("block", [4096, 1000, 1 << 22])
def test_a_sink_gets_every_byte_in_file_order(block, tmp_path, monkeypatch):
    """The blocks tile the file after its header; their outputs are the bytes rewrite
    writes; each block names its tensor and its elements."""
    monkeypatch.setattr(shards, "BLOCK_BYTES", block)
    src, t = _file(tmp_path)
    g = SignedPerm.random(64, seed=1)
    moves = {"w": shards.Move(g, 1), "e": shards.Move(g, 0)}
    sink = Collect()
    layout = shards.stream(src, moves, sink)
    assert sink.closed is True
    pos = len(layout.header)
    for b in sink.blocks:
        assert b.offset == pos and b.n > 0
        pos += b.n
        if b.entry is not None:
            start, count = b.elements
            assert b.entry.begin + start * shards.itemsize(b.entry.dtype) == b.offset
            assert count * shards.itemsize(b.entry.dtype) == b.n
    assert pos == layout.size
    shards.rewrite(src, tmp_path / "y.safetensors", moves)
    assert bytes(sink.data) == (tmp_path / "y.safetensors").read_bytes()[len(layout.header):]
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), g.apply(t["w"], 1))
        assert torch.equal(f.get_tensor("e"), g.apply(t["e"], 0))
        assert torch.equal(f.get_tensor("ids"), t["ids"])


@pytest.mark.parametrize("kernel", ["copies", "refuses", "has no copy_file_range"])
def test_untouched_bytes_are_the_input_s_however_they_are_copied(kernel, tmp_path, monkeypatch):
    """Untouched bytes are copied in the kernel (copy_file_range), or written from the mapped
    input where the system cannot (another file system, no such call): the same bytes."""
    monkeypatch.setattr(shards, "BLOCK_BYTES", 4096)
    src, t = _file(tmp_path)
    if kernel == "refuses":
        def refuse(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(shards, "_copy_file_range", refuse)
    elif kernel != "copies":
        monkeypatch.setattr(shards, "_copy_file_range", None)
    shards.rewrite(src, tmp_path / "same.safetensors", {})
    assert (tmp_path / "same.safetensors").read_bytes() == src.read_bytes()
    g = SignedPerm.random(64, seed=4)
    shards.rewrite(src, tmp_path / "y.safetensors", {"w": shards.Move(g, 1)},
                   metadata={"format": "pt", "longer": "x" * 100})  # every byte shifted
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), g.apply(t["w"], 1))
        for k in ("e", "ids", "empty"):
            assert torch.equal(f.get_tensor(k), t[k]), k


def test_digest_sink_hashes_each_moved_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BLOCK_BYTES", 4096)
    src, t = _file(tmp_path)
    g = SignedPerm.random(64, seed=2)
    moves = {"w": shards.Move(g, 1), "e": shards.Move(g, 0)}
    sink = shards.DigestSink(lambda e: e.name.encode())
    shards.stream(src, moves, sink)
    moved = {"w": g.apply(t["w"], 1), "e": g.apply(t["e"], 0), "ids": t["ids"],
             "empty": t["empty"]}
    for k, v in moved.items():
        raw = v.contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b""
        assert sink.digests[k] == hashlib.sha256(k.encode() + raw).hexdigest(), k


def test_a_failing_sink_stops_the_stream_and_is_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BLOCK_BYTES", 4096)
    src, _ = _file(tmp_path)

    class Fail(Collect):
        def take(self, block, src, out):
            if len(self.blocks) == 3:
                raise GaugefixError("sink full")
            return super().take(block, src, out)

    sink = Fail()
    with pytest.raises(GaugefixError, match="sink full"):
        shards.stream(src, {"w": shards.Move(SignedPerm.random(64, seed=3), 1)}, sink)
    assert sink.closed is False and len(sink.blocks) == 3


def test_unmovable_dtype_is_refused_before_any_block(tmp_path):
    src, _ = _file(tmp_path)
    layout = shards.read_layout(src)
    fake = shards.Layout(layout.header, layout.metadata, tuple(
        shards.Entry(e.name, "F4" if e.name == "w" else e.dtype, e.shape, e.begin, e.end)
        for e in layout.entries), layout.size)
    with pytest.raises(GaugefixError, match="dtype F4"):
        shards.plan_blocks(fake, {"w": shards.Move(SignedPerm.random(64, seed=0), 1)}, "x")
    assert shards.plan_blocks(fake, {}, "x")  # untouched: copied as bytes


def test_no_module_imports_private_names_of_another():
    """The engine's API is public: no gaugefix module imports a ``_name`` from shards."""
    root = Path(gaugefix.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("shards"):
                bad += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad
