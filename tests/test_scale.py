"""Scale: streamed rewrites give the same bytes as whole-tensor writes, identities are
taken on the way, and memory stays bounded by blocks."""

from __future__ import annotations

import pytest
import torch
from blake3 import blake3
from safetensors import safe_open
from safetensors.torch import save_file

from gaugefix.apply import gauge_checkpoint
from gaugefix.arch import get_family
from gaugefix.group import SignedPerm
from gaugefix.io import blake3_files
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
    assert rep.source_blake3 == blake3_files(order)
    assert rep.blake3 == blake3_files([tmp_path / "B" / s.name for s in order])


def test_apply_runs_without_importing_torch(tmp_path):
    """Importing torch is most of a command's start-up (1.3 s of 1.6 s here): `apply` on a
    safetensors checkpoint moves numpy views of the bits and never imports it; nor tqdm
    (15% of what is left) when its bar cannot show (stderr is not a terminal)."""
    import subprocess
    import sys

    build_tiny("qwen3", seed=0).save_pretrained(tmp_path / "A")
    code = ("import sys\nfrom gaugefix.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('TORCH', 'torch' in sys.modules, 'tqdm' in sys.modules, code)")
    res = subprocess.run([sys.executable, "-c", code, "apply", str(tmp_path / "A"),
                          str(tmp_path / "B"), "--random", "3", "--gauge-out",
                          str(tmp_path / "g.json")], capture_output=True, text=True)
    assert res.stdout.strip().endswith("TORCH False False 0"), res.stdout + res.stderr
    assert SignedPerm.load(tmp_path / "g.json") == SignedPerm.random(64, seed=3)


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


def test_hashes_match_blake3_over_many_blocks(tmp_path, monkeypatch):
    import gaugefix.shards as shards

    monkeypatch.setattr(shards, "BLOCK_BYTES", 4096)
    t = {"w": torch.randn(300, 64), "v": torch.randn(64)}
    save_file(t, str(tmp_path / "x.safetensors"))
    h = shards.Hashes(True, True)
    g = SignedPerm.random(64, seed=1)
    layout = shards.read_layout(tmp_path / "x.safetensors")
    moves = {"w": shards.Move(g, 1), "v": None}
    shards.rewrite(tmp_path / "x.safetensors", tmp_path / "y.safetensors", moves, hashes=h)
    src, dst = h.hexdigests()
    h.close()
    assert src == blake3((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    assert dst == blake3((tmp_path / "y.safetensors").read_bytes()).hexdigest()
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
    from gaugefix.model import open_model

    get = {n: open_model(tmp_path / n).tensor for n in ("A", "B", "base", "M")}
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


# ---------------------------------------------------------------------------- budgets
def _weights_bytes(path):
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "mixtral", "gpt_neox", "mamba"])
def test_statistics_within_a_budget_smaller_than_one_model(family, tmp_path):
    """Layer by layer, within a budget smaller than either model: the statistics equal the
    in-memory ones at every position (the same batches, so to the last bit here; to float
    rounding in general)."""
    import numpy as np

    from gaugefix.apply import gauge_model
    from gaugefix.estimate import StatsOptions, activation_stats

    sizes = {"gpt2": {"n_inner": 1024}, "gpt_neox": {"intermediate_size": 1024},
             "mamba": {"expand": 8}}.get(family, {"intermediate_size": 1024})
    a = build_tiny(family, seed=1, num_hidden_layers=8, **sizes)
    fam = get_family(family)
    g = SignedPerm.random(64, seed=2, kind="signed" if fam.allows_signs else "global")
    a.save_pretrained(tmp_path / "A")
    gauge_model(a, g).save_pretrained(tmp_path / "B")
    budget = int(0.9 * _weights_bytes(tmp_path / "A"))  # not even one model fits
    ids = np.random.default_rng(0).integers(0, 128, 512)
    opts = {"tokens": ids, "n_tokens": 512, "seq_len": 32, "batch_size": 2,
            "per_position": True}
    mem = activation_stats(tmp_path / "A", tmp_path / "B", StatsOptions(**opts))
    lw = activation_stats(tmp_path / "A", tmp_path / "B",
                          StatsOptions(**opts, max_memory=budget))
    assert lw.positions == mem.positions and lw.n_tokens == mem.n_tokens == 512
    for p in mem.positions:
        for k in ("mean_a", "mean_b", "m2_a", "m2_b", "cross"):
            x, y = getattr(mem.per_position[p], k), getattr(lw.per_position[p], k)
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(x.abs().max())), (p, k)


def test_budget_from_the_command_line_and_its_refusals(tmp_path, cli):
    import json

    import numpy as np

    a = build_tiny("llama", seed=1, num_hidden_layers=8, intermediate_size=1024)
    a.save_pretrained(tmp_path / "A")
    from gaugefix.apply import gauge_model

    g = SignedPerm.random(64, seed=3)
    gauge_model(a, g).save_pretrained(tmp_path / "B")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 128, 1024))
    common = ["--tokens-from", tmp_path / "ids.npy", "--tokens", 1024, "--seq-len", 32,
              "--batch-size", 2]
    assert _weights_bytes(tmp_path / "A") > 6_000_000  # the budget below is less than a model
    cli("match", tmp_path / "A", tmp_path / "B", "-o", tmp_path / "g.json", "--max-memory",
        "5MB", *common)
    assert SignedPerm.load(tmp_path / "g.json") == g
    cli("stats", tmp_path / "A", tmp_path / "B", "-o", tmp_path / "s.safetensors",
        "--max-memory", "4.9MiB", *common)
    res = cli("trajectory", tmp_path / "A", tmp_path / "B", tmp_path / "A", "-o",
              tmp_path / "t.json", "--max-memory", "5MB", "--json", *common)
    assert len(json.loads(res.stdout)) == 2
    assert SignedPerm.load(tmp_path / "t.json") == SignedPerm.identity(64)

    res = cli("match", tmp_path / "A", tmp_path / "B", "-o", tmp_path / "x.json",
              "--max-memory", "1MB", *common, ok=False)
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert "--max-memory 1.0 MB is too small: decoder layer 0 takes 0.8 MB" in res.stderr
    for bad, message in (("lots", "is not a size"), ("0MB", "must be positive")):
        res = cli("match", tmp_path / "A", tmp_path / "B", "-o", tmp_path / "x.json",
                  "--max-memory", bad, ok=False)
        assert res.exit_code == 2 and message in res.stderr, res.stderr
    res = cli("match", tmp_path / "A", tmp_path / "B", "-o", tmp_path / "x.json",
              "--max-memory", "5MB", "--device-map", "auto", ok=False)
    assert res.exit_code == 2 and "not both" in res.stderr
    assert not (tmp_path / "x.json").exists()


def test_device_map_auto_gives_the_in_memory_statistics(tmp_path):
    import numpy as np

    from gaugefix.estimate import StatsOptions, activation_stats

    build_tiny("qwen2", seed=1).save_pretrained(tmp_path / "A")
    build_tiny("qwen2", seed=2).save_pretrained(tmp_path / "B")
    ids = np.random.default_rng(0).integers(0, 128, 512)
    mem = activation_stats(tmp_path / "A", tmp_path / "B", StatsOptions(tokens=ids,
                                                                        n_tokens=512))
    auto = activation_stats(tmp_path / "A", tmp_path / "B", StatsOptions(
        tokens=ids, n_tokens=512, device_map="auto"))
    assert torch.allclose(mem.pooled.cross, auto.pooled.cross, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- torchrun
def _torchrun(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([str(exe), "--standalone", "--nproc-per-node", "2", "-m",
                             "gaugefix", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture
def pair(tmp_path):
    import numpy as np

    from gaugefix.apply import gauge_model

    a = build_tiny("llama", seed=1)
    a.save_pretrained(tmp_path / "A")
    gauge_model(a, SignedPerm.random(64, seed=2)).save_pretrained(tmp_path / "B")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 128, 33 * 32))
    return tmp_path


def test_torchrun_statistics_equal_a_single_process(pair, cli):
    """Two gloo processes on localhost, 33 windows split 16/17: the same statistics file."""
    from safetensors.torch import load_file

    common = ["--tokens-from", pair / "ids.npy", "--tokens", 33 * 32, "--seq-len", 32,
              "--per-layer"]
    cli("stats", pair / "A", pair / "B", "-o", pair / "one.safetensors", *common)
    proc = _torchrun("stats", pair / "A", pair / "B", "-o", pair / "two.safetensors", *common)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    one, two = load_file(pair / "one.safetensors"), load_file(pair / "two.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        scale = float(one[k].abs().max()) or 1.0
        assert float((one[k] - two[k]).abs().max()) <= 1e-6 * scale, k
    from gaugefix.stats import CrossStats

    st = CrossStats.load(pair / "two.safetensors")
    assert st.n_tokens == 33 * 32 and st.meta["world_size"] == 2
    proc = _torchrun("match", pair / "A", pair / "B", "-o", pair / "g.json", *common)
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert SignedPerm.load(pair / "g.json") == SignedPerm.random(64, seed=2)


def test_torchrun_refuses_more_ranks_than_windows(pair):
    proc = _torchrun("stats", pair / "A", pair / "B", "-o", pair / "s.safetensors",
                     "--tokens-from", pair / "ids.npy", "--tokens", 128, "--seq-len", 128)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "2 processes but only 1 token windows" in err
    assert not list(pair.glob("s.safetensors*")) and not list(pair.glob(".s.safetensors*"))


def test_a_killed_rank_leaves_nothing_written(pair):
    import signal
    import time

    import numpy as np
    import psutil

    # long enough (tens of seconds per rank) that the kill lands while the ranks compute;
    # a rank dying after the final barrier would find the result complete, and rightly kept
    n = 4_000_000
    np.save(pair / "many.npy", np.random.default_rng(1).integers(0, 128, n))
    proc = _torchrun("stats", pair / "A", pair / "B", "-o", pair / "s.safetensors",
                     "--tokens-from", pair / "many.npy", "--tokens", n, "--seq-len", 64)
    deadline = time.monotonic() + 120
    workers: list = []
    while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "gaugefix" in " ".join(p.cmdline())]
        time.sleep(0.1)
    assert len(workers) == 2, "torchrun did not start two workers"
    time.sleep(6)  # into the statistics (start-up takes a few seconds)
    assert proc.poll() is None, "the ranks finished before one could be killed"
    workers[-1].send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not (pair / "s.safetensors").exists()
    assert not [p for p in pair.iterdir() if ".gaugefix-" in p.name]


def test_audit_within_a_budget_gives_the_in_memory_report(tmp_path, cli):
    import json

    import numpy as np

    from gaugefix.apply import gauge_model

    a = build_tiny("llama", seed=1, num_hidden_layers=6, intermediate_size=1024)
    a.save_pretrained(tmp_path / "A")
    gauge_model(a, SignedPerm.random(64, seed=3)).save_pretrained(tmp_path / "B")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 128, 1024))
    claim = {"format": "gaugefix.claim/1", "layer": 3, "source": str(tmp_path / "A"),
             "concept": {"positive": [[5, 6, 7, 8]], "negative": [[5, 6, 9, 8]]},
             "coordinates": [{"index": 3, "sign": 1}, {"index": 9, "sign": -1}]}
    (tmp_path / "claim.json").write_text(json.dumps(claim))
    common = ["--gauges", 2, "--tokens-from", tmp_path / "ids.npy", "--tokens", 1024, "--json"]
    mem = json.loads(cli("audit", tmp_path / "claim.json", tmp_path / "B", *common).stdout)
    lw = json.loads(cli("audit", tmp_path / "claim.json", tmp_path / "B", "--max-memory",
                        "40MB", *common).stdout)  # layers on disk, batches of 8 × 128 tokens
    assert lw["rows"] == mem["rows"] and lw["summary"] == mem["summary"]


def test_a_full_disk_leaves_nothing_partial(tmp_path, cli, monkeypatch):
    """The disk fills up in the middle of a checkpoint (the second shard finds no room for
    its blocks): one error line, exit 2, no output and no temporary left (the transaction
    removes what was begun)."""
    import errno
    import os

    import gaugefix.shards as shards

    build_tiny("llama", seed=1).save_pretrained(tmp_path / "A", max_shard_size="100KB")
    reserved = []

    def full(fd, offset, size):
        reserved.append(size)
        if sum(reserved) > 150_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.posix_fallocate(fd, offset, size)

    monkeypatch.setattr(shards, "_fallocate", full)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli("apply", tmp_path / "A", tmp_path / "B", "--random", 1, "--gauge-out",
              tmp_path / "g.json", ok=False)
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "No space left on device" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
