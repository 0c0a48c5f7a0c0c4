"""`gaugefix apply` against `cp -r` of the same files, and its peak memory.

Generates a Llama-shaped checkpoint of random bf16 weights on disk (sharded like
save_pretrained, and as one file), then times, with the page cache warm and the order
alternated, `cp -r` and the `gaugefix apply` command (with and without --gauge-out, which
adds both identities), each as a child process whose peak RSS is read from wait4; then once
each with the page cache emptied (when run as root). Targets (issue 9): throughput ≥ 0.5× cp;
peak RSS ≤ 2× the largest tensor + 0.6 GB. Also, on one thread and in this process, the
gather itself against a copy of the same bytes: every moved block of the checkpoint through
the primitive as apply moves it (``shards.move_block``, into a buffer of one block) against
``np.copyto`` of the block's input bytes into the same buffer, in GB/s of output, by where
the residual axis is (last: a gather of single elements; not last: of whole rows).

    python benchmarks/bench_apply.py [--hidden 2048] [--layers 24] [--vocab 32000]
                                     [--shard-gb 1.0] [--dir /path/with/space] [--repeat 5]
                                     [--no-cold] [--before EXE]

``--before EXE``: also time another build's ``gaugefix`` (a script that runs an older
checkout's ``gaugefix.cli:main``), alternated with this one's in the same run, so that a
change is measured against what it replaced on the same machine at the same moment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

EXE = str(Path(sys.executable).with_name("gaugefix"))


def shard_groups(shapes: dict[str, tuple[int, ...]], item: int, limit: float
                 ) -> list[list[str]]:
    """Tensor names in shards of at most ``limit`` bytes, in order (as save_pretrained)."""
    groups: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        n = item * int(torch.Size(s).numel())
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups


def generate(path: Path, *, hidden: int, layers: int, vocab: int, shard_gb: float | None,
             dtype: torch.dtype = torch.bfloat16) -> tuple[float, int]:
    """A random-weight checkpoint laid out as save_pretrained lays it out; returns (GB, largest
    tensor bytes). Tensors are generated shard by shard (peak memory ≈ one shard)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, vocab_size=vocab,
                         num_attention_heads=max(1, hidden // 128),
                         num_key_value_heads=max(1, hidden // 512), tie_word_embeddings=False,
                         dtype="bfloat16")
    path.mkdir(parents=True)
    config.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    item = torch.empty((), dtype=dtype).element_size()
    groups = shard_groups(shapes, item, float("inf") if shard_gb is None else shard_gb * 1e9)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        name = ("model.safetensors" if len(groups) == 1 else
                f"model-{i:05d}-of-{len(groups):05d}.safetensors")
        tensors = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(dtype) for k in keys}
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    total = write_index(path, shapes, item, weight_map)
    largest = max(item * int(torch.Size(s).numel()) for s in shapes.values())
    return total / 1e9, largest


def write_index(path: Path, shapes: dict[str, tuple[int, ...]], item: int,
                weight_map: dict[str, str]) -> int:
    """The shard index save_pretrained writes beside more than one shard; returns the
    checkpoint's bytes."""
    total = sum(item * int(torch.Size(s).numel()) for s in shapes.values())
    if len(set(weight_map.values())) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


# A small launcher forks the command and reports its child's peak RSS (maxrss: measured from
# this large process, a child's would include this process's pages up to its exec), and the
# peak of its anonymous memory (sampled from /proc every 10 ms): file-backed pages (shared
# libraries, mapped checkpoint files) are shared and reclaimable, anonymous ones are not.
LAUNCHER = """import os, sys, threading, time
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
peak = [0]
def sample():
    while True:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        except OSError:
            return
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nMAXRSS {usage.ru_maxrss} ANON {peak[0]}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str], anon: bool = False) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one child process; ``anon``: the peak of its
    anonymous memory instead. Dirty pages of earlier runs are flushed first, so that their
    writeback does not land on this run's clock (on 2 cores it doubled some timings)."""
    os.sync()
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr[-2000:]}")
    fields = res.stderr.rsplit("MAXRSS", 1)[1].split()
    return seconds, int(fields[2] if anon else fields[0]) * 1024


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """The best of ``repeat`` timed calls of ``fn`` (seconds)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gather_vs_copy(src: Path, repeat: int) -> dict:
    """GB/s of the gather (``shards.move_block``, one thread) and of ``np.copyto`` of the
    same bytes into the same buffer, over every block apply moves in ``src`` (page cache
    warm; each block's best of ``repeat``), by whether the residual axis is the last."""
    import mmap

    import numpy as np

    from gaugefix import open_model
    from gaugefix.apply import plan_checkpoint
    from gaugefix.group import SignedPerm
    from gaugefix.shards import BLOCK_BYTES, gauge_moves, move_block, plan_blocks, read_layout

    m = open_model(src)
    assert m.checkpoint is not None
    gauge = SignedPerm.random(m.hidden_size, 0, kind="signed")
    plan = plan_checkpoint(m.checkpoint, gauge)
    buf = np.empty(BLOCK_BYTES, np.uint8)
    seconds: dict[tuple[str, str], float] = {}
    size: dict[str, int] = {}
    for shard in m.checkpoint.shards:
        layout = read_layout(shard)
        with open(shard, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            data = memoryview(mm)
            for b in plan_blocks(layout, gauge_moves(plan, gauge, layout)):
                if b.move is None or b.move.whole is not None:
                    continue
                axis = "residual axis last" if b.shape[2] == 1 else "residual axis not last"
                size[axis] = size.get(axis, 0) + b.n
                out, raw = buf[:b.n], np.frombuffer(data[b.offset:b.offset + b.n], np.uint8)
                runs = {"gather": partial(move_block, b, data, out.data),
                        "copy": partial(np.copyto, out, raw)}
                for name, fn in runs.items():
                    seconds[axis, name] = seconds.get((axis, name), 0.0) + best_of(fn, repeat)
                del out, raw, runs, fn  # views of the mapping: it closes when they are gone
            del data
    size["all moved blocks"] = sum(size.values())
    for name in ("gather", "copy"):
        seconds["all moved blocks", name] = sum(v for (a, k), v in seconds.items() if k == name)
    rows = {}
    for axis, n in size.items():
        gather, copy = n / seconds[axis, "gather"] / 1e9, n / seconds[axis, "copy"] / 1e9
        rows[axis] = {"GB": round(n / 1e9, 2), "gather_GB/s": round(gather, 2),
                      "copy_GB/s": round(copy, 2), "gather_vs_copy": round(gather / copy, 2)}
    return rows


def drop_caches() -> bool:
    """Empty the page cache (root on Linux), so that a run reads from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench(src: Path, work: Path, gb: float, largest: int, repeat: int, cold: bool,
          before: str | None = None) -> dict:
    """Best of ``repeat`` runs of each case, in alternating order (this VM's page-cache
    writes vary run to run by up to 4× in system time, for cp as for gaugefix: the best run
    is the machine's, the others its neighbours'); with ``cold``, also each case once more
    with the page cache emptied before it."""
    cases = {
        "cp -r": lambda out: ["cp", "-r", str(src), str(out)],
        "gaugefix apply": lambda out: [EXE, "apply", str(src), str(out), "--random", "0"],
        "gaugefix apply --gauge-out": lambda out: [EXE, "apply", str(src), str(out), "--random",
                                                   "0", "--gauge-out", str(out) + ".json"],
        "gaugefix (start-up only)": lambda out: [EXE, "apply", "--help"],
    }
    if before is not None:
        cases["before: gaugefix apply"] = lambda out: [before, "apply", str(src), str(out),
                                                       "--random", "0"]
        cases["before: gaugefix apply --gauge-out"] = lambda out: [
            before, "apply", str(src), str(out), "--random", "0", "--gauge-out",
            str(out) + ".json"]
    runs: dict[str, list[tuple[float, int]]] = {}
    subprocess.run(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL, check=True)
    order = [(r, name) for r in range(repeat)
             for name in (list(cases) if r % 2 == 0 else list(reversed(cases)))]
    if cold and drop_caches():
        order += [(-1, name) for name in cases if "start-up" not in name]
    for r, name in order:
        out = work / "out"
        if r < 0:
            drop_caches()
        secs, rss = run(cases[name](out))
        shutil.rmtree(out, ignore_errors=True)
        Path(str(out) + ".json").unlink(missing_ok=True)
        runs.setdefault(name + (" (cold cache)" if r < 0 else ""), []).append((secs, rss))
    cp, cp_cold = (min(s for s, _ in runs[k]) if k in runs else None
                   for k in ("cp -r", "cp -r (cold cache)"))
    target_rss = 2 * largest + 0.6e9
    rows = {}
    for name, results in runs.items():
        secs = min(s for s, _ in results)
        rss = max(m for _, m in results)
        base = cp_cold if "cold" in name else cp
        rows[name] = {"seconds": round(secs, 2),
                      "median_seconds": round(sorted(s for s, _ in results)[len(results) // 2],
                                              2),
                      "GB/s": round(gb / secs, 2),
                      "throughput_vs_cp": round(base / secs, 2) if base else None,
                      "peak_rss_GB": round(rss / 1e9, 2), "rss_within_target": rss <= target_rss}
    return {"checkpoint_GB": round(gb, 2), "largest_tensor_GB": round(largest / 1e9, 3),
            "rss_target_GB": round(target_rss / 1e9, 2), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-cold", dest="cold", action="store_false",
                    help="skip the cold-cache runs (they need root to empty the page cache)")
    ap.add_argument("--before", default=None, help="another build's gaugefix, timed alongside")
    ap.add_argument("--dir", default=None, help="where to generate (needs ~4× the checkpoint)")
    args = ap.parse_args()
    load = os.getloadavg()[:1]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        results = {}
        for label, shard in (("sharded", args.shard_gb), ("single file", None)):
            src = root / label.replace(" ", "-")
            gb, largest = generate(src, hidden=args.hidden, layers=args.layers,
                                   vocab=args.vocab, shard_gb=shard)
            results[label] = bench(src, root, gb, largest, args.repeat, args.cold,
                                   args.before)
            if label == "sharded":  # the same blocks either way
                results["gather (one thread)"] = gather_vs_copy(src, args.repeat)
            shutil.rmtree(src)
    load = (*load, *os.getloadavg()[:1])  # the machine's, before and after: it is shared
    print(json.dumps({"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                      "load_average": load, **results}, indent=2))
    print(f"\nload average (1 min) before and after: {load[0]:.2f}, {load[1]:.2f}")
    print("\ngather against np.copyto of the same bytes, one thread:")
    for axis, row in results.pop("gather (one thread)").items():
        print(f"  {axis:40s} {row['GB']:5.2f} GB  gather {row['gather_GB/s']:5.2f} GB/s  "
              f"copy {row['copy_GB/s']:5.2f} GB/s  ratio {row['gather_vs_copy']:4.2f}")
    for label, r in results.items():
        print(f"\n{label}: {r['checkpoint_GB']} GB, largest tensor {r['largest_tensor_GB']} GB, "
              f"RSS target {r['rss_target_GB']} GB")
        for name, row in r["rows"].items():
            print(f"  {name:40s} {row['seconds']:6.2f} s (median {row['median_seconds']:5.2f}) "
                  f"{row['GB/s']:5.2f} GB/s  vs cp {row['throughput_vs_cp']:4.2f}×  "
                  f"peak RSS {row['peak_rss_GB']:5.2f} GB")


if __name__ == "__main__":
    main()
