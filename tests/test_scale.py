"""Scale (#9): streamed rewrites give the same bytes as whole-tensor writes, identities are
taken on the way, and memory stays bounded by blocks."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gaugefix.apply import gauge_checkpoint
from gaugefix.arch import get_family
from gaugefix.group import SignedPerm
from gaugefix.io import sha256_files
from gaugefix.tiny import build_tiny

from .conftest import FAMILIES


def _reference_shard(src, dst, gauge, fam):
    """What gaugefix wrote before streaming: every tensor moved whole, saved by safetensors."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        new = {k: fam.op_for(k)(gauge, f.get_tensor(k)).contiguous() for k in f.keys()}  # noqa: SIM118
    save_file(new, str(dst), metadata=meta or {"format": "pt"})


@pytest.mark.parametrize("block", [None, 512])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_apply_writes_the_bytes_safetensors_would(family, block, tmp_path, monkeypatch):
    import gaugefix.shards as shards

    if block is not None:  # tiny models never reach the real block size: force the blocked path
        monkeypatch.setattr(shards, "BLOCK_BYTES", block)
    fam = get_family(family)
    src = tmp_path / "A"
    build_tiny(family, seed=4).save_pretrained(src, max_shard_size="40KB")
    g = SignedPerm.random(64, seed=5, kind="signed" if fam.allows_signs else "global")
    rep = gauge_checkpoint(src, tmp_path / "B", g, progress=False, identities=True)
    shard_files = sorted(src.glob("*.safetensors"))
    assert len(shard_files) > 1
    (tmp_path / "ref").mkdir()
    for shard in shard_files:
        _reference_shard(shard, tmp_path / "ref" / shard.name, g, fam)
        assert (tmp_path / "B" / shard.name).read_bytes() == (
            tmp_path / "ref" / shard.name).read_bytes(), shard.name
    from gaugefix.checkpoint import Checkpoint

    order = Checkpoint.open(src).shards
    assert rep.source_sha256 == sha256_files(order)
    assert rep.sha256 == sha256_files([tmp_path / "B" / s.name for s in order])


def test_metadata_can_change_without_moving_the_data(tmp_path):
    from gaugefix.shards import read_layout, rewrite

    t = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    rewrite(tmp_path / "x.safetensors", tmp_path / "y.safetensors", {},
            metadata={"format": "pt", "gaugefix": '{"d": 5}'})
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "gaugefix": '{"d": 5}'}
        assert torch.equal(f.get_tensor("a"), t["a"]) and torch.equal(f.get_tensor("b"), t["b"])
    assert len(read_layout(tmp_path / "y.safetensors").header) % 8 == 0


def test_hashes_match_hashlib_over_many_blocks(tmp_path, monkeypatch):
    import gaugefix.shards as shards

    monkeypatch.setattr(shards, "BLOCK_BYTES", 4096)
    t = {"w": torch.randn(300, 64), "v": torch.randn(64)}
    save_file(t, str(tmp_path / "x.safetensors"))
    h = shards.Hashes(True, True)
    g = SignedPerm.random(64, seed=1)
    layout = shards.read_layout(tmp_path / "x.safetensors")
    moves = {"w": (1, lambda x, ax: g.apply(x, ax)), "v": None}
    shards.rewrite(tmp_path / "x.safetensors", tmp_path / "y.safetensors", moves, hashes=h)
    src, dst = h.hexdigests()
    h.close()
    assert src == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    assert dst == hashlib.sha256((tmp_path / "y.safetensors").read_bytes()).hexdigest()
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), g.apply(t["w"], 1))
    assert layout.entries[0].begin == len(layout.header)


def _reference_merge(a, b, method, w, base=None):
    """What gaugefix wrote before streaming: whole tensors in float64, cast to A's dtype."""
    if not a.is_floating_point():
        return a
    a64, b64 = a.double(), b.double()
    if method == "linear":
        out = (1 - w) * a64 + w * b64
    elif method == "task-arithmetic":
        out = base.double() + (a64 - base.double()) + w * (b64 - base.double())
    else:
        na, nb = a64.norm(), b64.norm()
        theta = torch.arccos(torch.clamp(torch.dot(a64.reshape(-1) / na, b64.reshape(-1) / nb),
                                         -1, 1))
        s = torch.sin(theta)
        out = torch.sin((1 - w) * theta) / s * a64 + torch.sin(w * theta) / s * b64
    return out.to(a.dtype)


@pytest.mark.parametrize("method", ["linear", "task-arithmetic", "slerp"])
def test_streamed_merge_matches_whole_tensor_merges(method, tmp_path, monkeypatch):
    import gaugefix.shards as shards
    from gaugefix.transport import merge_checkpoints

    monkeypatch.setattr(shards, "BLOCK_BYTES", 1000)
    for name, seed, dtype in (("A", 1, torch.bfloat16), ("B", 2, torch.float32),
                              ("base", 3, torch.float16)):
        build_tiny("llama", seed=seed).to(dtype).save_pretrained(tmp_path / name,
                                                                 max_shard_size="60KB")
    extra = {"base": tmp_path / "base"} if method == "task-arithmetic" else {}
    merge_checkpoints(tmp_path / "A", tmp_path / "B", None, tmp_path / "M", method=method,
                      weight=0.3, **extra)
    from gaugefix.checkpoint import Checkpoint

    get = {n: Checkpoint.open(tmp_path / n).getter() for n in ("A", "B", "base", "M")}
    for shard in Checkpoint.open(tmp_path / "A").shards:
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                ref = _reference_merge(get["A"](k), get["B"](k), method, 0.3, get["base"](k))
                out = get["M"](k)
                assert out.dtype == torch.bfloat16
                if method == "slerp":  # coefficients from blocked sums: ulp-level differences
                    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-6), k
                else:
                    assert torch.equal(out, ref), k
