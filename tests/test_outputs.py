"""Outputs appear whole or not at all: concurrent writers, signals, killed runs, rollbacks.

The process tests run the installed console script on a checkpoint large enough (≈130 MB)
that a signal lands while it is writing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm
from gaugefix.io import atomic_dir, atomic_write_text, transaction

EXE = str(Path(sys.executable).with_name("gaugefix"))


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".gaugefix-" in p.name]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A Llama-shaped checkpoint of ≈130 MB in 20 MB shards (random weights)."""
    from gaugefix.tiny import build_tiny

    path = tmp_path_factory.mktemp("big") / "big"
    build_tiny("llama", hidden_size=512, vocab_size=32000, intermediate_size=1024,
               num_attention_heads=8, num_key_value_heads=8, generic=True
               ).save_pretrained(path, max_shard_size="20MB")
    return path


def _start(*args: object) -> subprocess.Popen:
    return subprocess.Popen([EXE, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def _wait_for_temporary(proc: subprocess.Popen, parent: Path, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if _temporaries(parent):
            return True
        time.sleep(0.002)
    return False


def _frozen_while_writing(proc: subprocess.Popen, parent: Path) -> bool:
    """Stop ``proc`` (SIGSTOP) as soon as its temporary output appears, so that what is sent
    next lands while it is writing however fast the write is; False if it finished first."""
    if not _wait_for_temporary(proc, parent):
        return False
    proc.send_signal(signal.SIGSTOP)
    if proc.poll() is not None or not _temporaries(parent):
        proc.send_signal(signal.SIGCONT)
        return False
    return True


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_while_writing_leaves_nothing(big, tmp_path, sig):
    signum = getattr(signal, sig)
    for attempt in range(3):  # the write may finish before the signal lands: try again
        out = tmp_path / f"out{attempt}"
        proc = _start("apply", big, out, "--random", 1, "--gauge-out", tmp_path / "g.json")
        if not _frozen_while_writing(proc, tmp_path):
            proc.communicate()
            continue
        proc.send_signal(signum)  # pending until the process runs again, mid-write
        proc.send_signal(signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue
        assert proc.returncode == 128 + signum, stderr
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert lines == [f"error: interrupted by {sig}; nothing was written (temporary "
                         "outputs removed)"], stderr
        assert not out.exists() and not (tmp_path / "g.json").exists()
        assert _temporaries(tmp_path) == []
        return
    pytest.fail("the signal never landed while apply was writing")


def test_a_killed_run_is_cleaned_up_by_the_next(big, tmp_path, cli):
    out = tmp_path / "out"
    proc = _start("apply", big, out, "--random", 1)
    assert _frozen_while_writing(proc, tmp_path), "apply finished before it could be killed"
    proc.kill()
    proc.communicate()
    left = _temporaries(tmp_path)
    assert left and not out.exists()  # SIGKILL cannot be caught: the temporary stays
    res = cli("apply", big, out, "--random", 1)
    assert f"removed {left[0].name}" in res.stderr and f"(pid {proc.pid})" in res.stderr
    assert _temporaries(tmp_path) == [] and (out / "config.json").is_file()


def test_an_output_set_aside_by_a_killed_overwrite_is_restored(tmp_path, cli, tiny_ckpt):
    from gaugefix.io import OLD_MARK, _sibling

    a = tiny_ckpt("llama")
    dead = subprocess.Popen(["true"])  # a pid that no longer runs
    dead.wait()
    aside = _sibling(tmp_path / "out", OLD_MARK)
    aside = aside.with_name(aside.name.replace(f".{os.getpid()}.", f".{dead.pid}."))
    aside.mkdir()
    (aside / "mine.txt").write_text("the old output")
    res = cli("apply", a, tmp_path / "out", "--random", 1, ok=False)
    assert "warning: restored" in res.stderr and "already exists" in res.stderr
    assert (tmp_path / "out" / "mine.txt").read_text() == "the old output"
    assert _temporaries(tmp_path) == []


def test_concurrent_writers_to_one_output_have_exactly_one_winner(tmp_path, tiny_ckpt):
    a = tiny_ckpt("llama", hidden_size=256, vocab_size=8000, intermediate_size=512)
    src = load_file(a / "model.safetensors")
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        gauges = {s: tmp_path / f"g{trial}-{s}.json" for s in (10, 11)}
        procs = {s: _start("apply", a, out, "--random", s, "--gauge-out", g)
                 for s, g in gauges.items()}
        results = {s: (p.communicate(timeout=300), p.returncode) for s, p in procs.items()}
        winners = [s for s, (_, code) in results.items() if code == 0]
        assert len(winners) == 1, results
        (loser,) = set(results) - set(winners)
        (_, stderr), code = results[loser]
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: output "), stderr
        assert "already exists" in lines[0] or "created by another process" in lines[0]
        assert not gauges[loser].exists()  # the loser's gauge file went with it
        g = SignedPerm.load(gauges[winners[0]])  # the winner's gauge describes the output
        written = load_file(out / "model.safetensors")
        from gaugefix.arch import get_family

        fam = get_family("llama")
        assert all(torch.equal(written[k], fam.op_for(k)(g, v)) for k, v in src.items())
        assert _temporaries(tmp_path) == []


# ---------------------------------------------------------------------------- the mechanism
def test_publishing_never_replaces_what_appeared_meanwhile(tmp_path):
    """Another writer publishes between our check and our publish: ours is dropped, theirs
    stays, for directories and files alike."""
    for kind in ("dir", "file"):
        target = tmp_path / f"out-{kind}"
        with pytest.raises(GaugefixError, match="created by another process"), transaction():
            if kind == "dir":
                with atomic_dir(target) as tmp:
                    (tmp / "ours.txt").write_text("ours")
                target.mkdir()
                (target / "theirs.txt").write_text("theirs")
            else:
                atomic_write_text(target, "ours")
                target.write_text("theirs")
        theirs = target / "theirs.txt" if kind == "dir" else target
        assert theirs.read_text() == "theirs"
    assert _temporaries(tmp_path) == []


def test_outputs_of_one_transaction_appear_together(tmp_path):
    with pytest.raises(RuntimeError, match="late failure"), transaction():
        atomic_write_text(tmp_path / "first.json", "{}")
        with atomic_dir(tmp_path / "second") as tmp:
            (tmp / "x").write_text("x")
        assert not (tmp_path / "first.json").exists()  # nothing published yet
        raise RuntimeError("late failure")
    assert list(tmp_path.iterdir()) == []
    with transaction():
        atomic_write_text(tmp_path / "first.json", "{}")
        atomic_write_text(tmp_path / "second.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.json", "second.json"]


def test_an_input_read_after_reserving_the_output_still_protects_it(tmp_path):
    from gaugefix.io import read_json

    (tmp_path / "doc.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(GaugefixError, match="is the input"), transaction():
        with atomic_dir(tmp_path / "doc.json", overwrite=True) as tmp:
            (tmp / "x").write_text("x")
        read_json(tmp_path / "doc.json", "document")
    assert json.loads((tmp_path / "doc.json").read_text()) == {"a": 1}
    assert _temporaries(tmp_path) == []


# ---------------------------------------------------------------------------- at the edges
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_after_publishing_says_the_outputs_are_there(tmp_path, cli, tiny_ckpt,
                                                              monkeypatch, sig):
    """A signal that lands once the outputs are published (here: while the command says what
    it wrote) leaves them, complete, and the message says so instead of 'nothing was
    written'."""
    import gaugefix.cli as cli_module

    a = tiny_ckpt("llama")
    signum = getattr(signal, sig)
    real = cli_module.out.print

    def interrupted(*args, **kwargs):
        if any("gauge written to" in str(x) for x in args):
            raise cli_module.Interrupted(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli_module.out, "print", interrupted)
    res = cli("apply", a, tmp_path / "B", "--random", 1, "--gauge-out", tmp_path / "g.json",
              ok=False)
    assert res.exit_code == 128 + signum
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "after the outputs were written" in lines[0], res.stderr
    assert "nothing was written" not in res.stderr
    assert SignedPerm.load(tmp_path / "g.json") == SignedPerm.random(64, seed=1)
    assert load_file(tmp_path / "B" / "model.safetensors").keys() == \
        load_file(a / "model.safetensors").keys()


@pytest.mark.parametrize("delay", [0.15, 0.4, 1.0])
def test_ctrl_c_while_starting_prints_one_line(tiny_ckpt, delay):
    """Ctrl-C while Python is still importing (gaugefix, torch, transformers) prints one line,
    never a traceback. (Before the console script's first line runs, the interpreter's own
    start, a Ctrl-C is Python's: see gaugefix._console.)"""
    a = tiny_ckpt("llama")
    proc = _start("inspect", a)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) <= 1, err
    if proc.returncode != 0:
        assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
        assert not lines or lines[0].startswith("error: interrupted"), err


DROP = """
import ctypes, os, sys
import gaugefix.cli
# Keep uid 0 (so the interpreter's own files, wherever its venv lives, stay readable: a venv
# under root's 0700 home is unreadable to any other uid, and imports happen lazily), but give
# up the capabilities that let root ignore file modes (DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER):
# files owned by another user are then checked against their 'other' bits, as for anyone.
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]
libc = ctypes.CDLL(None, use_errno=True)
head, data = Header(0x20080522, 0), (Data * 2)()
assert libc.capget(ctypes.byref(head), data) == 0, ctypes.get_errno()
for cap in (1, 2, 3):
    data[0].effective &= ~(1 << cap)
    data[0].permitted &= ~(1 << cap)
assert libc.capset(ctypes.byref(head), data) == 0, ctypes.get_errno()
sys.argv = ["gaugefix", *sys.argv[1:]]
gaugefix.cli.main()
"""
NOBODY = 65534


def _caps_effective() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0
                    or not Path("/proc/self/status").exists() or not _caps_effective() & 0b110,
                    reason="gives up root's power over file modes to make permissions real")
def test_permissions_are_real_once_root_is_dropped(tmp_path_factory):
    """As root every file is readable and writable, so these probes test nothing; the command
    gives up the capabilities that override file modes first, and the files it must not read
    or write belong to another user."""
    import shutil
    import tempfile

    from gaugefix.tiny import build_tiny

    root = Path(tempfile.mkdtemp(dir="/tmp"))
    root.chmod(0o755)
    try:
        build_tiny("llama", seed=0).save_pretrained(root / "A")
        for p in (root / "A", *(root / "A").iterdir()):
            p.chmod(0o755 if p.is_dir() else 0o644)
        (root / "locked").mkdir(mode=0o755)  # another user's: not writable by the command
        os.chown(root / "locked", NOBODY, NOBODY)
        os.chown(root / "A" / "config.json", NOBODY, NOBODY)
        (root / "A" / "config.json").chmod(0o600)  # another user's: unreadable
        res = subprocess.run([sys.executable, "-c", DROP, "inspect", str(root / "A")],
                             capture_output=True, text=True, timeout=300)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "config.json" in lines[0] and "ermission denied" in lines[0], lines
        (root / "A" / "config.json").chmod(0o644)
        res = subprocess.run([sys.executable, "-c", DROP, "apply", str(root / "A"),
                              str(root / "locked" / "B"), "--random", "1"],
                             capture_output=True, text=True, timeout=300)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "cannot write into" in lines[0], lines
        assert list((root / "locked").iterdir()) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_signal_right_after_a_temporary_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A signal can land between any two bytecodes: one just after the temporary directory
    of an output is made (the moment the signal test above freezes the process) finds it
    already registered, and the transaction removes it."""
    made = []
    mkdir = Path.mkdir

    def interrupted(self: Path, *args: object, **kwargs: object) -> None:
        mkdir(self, *args, **kwargs)
        made.append(self)
        raise KeyboardInterrupt  # what the CLI's handler raises for SIGINT, SIGTERM, SIGHUP

    monkeypatch.setattr(Path, "mkdir", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "out"):
        pass
    monkeypatch.undo()
    assert made and _temporaries(tmp_path) == [] and not (tmp_path / "out").exists()


LATE = """
import atexit, contextlib, os, signal, sys
import gaugefix.cli as cli
where, signame, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sig = getattr(signal, signame)
if where == "after-handlers":  # the moment the command's own handlers are put back
    unwind = cli._signals_unwind

    @contextlib.contextmanager
    def landing():
        with unwind():
            yield
        os.kill(os.getpid(), sig)

    cli._signals_unwind = landing
else:  # in the interpreter's shutdown, after click's sys.exit
    atexit.register(lambda: (os.kill(os.getpid(), sig), [None for _ in range(10**5)]))
sys.argv = ["gaugefix", *argv]
cli.main()
"""


@pytest.mark.parametrize("where", ["after-handlers", "at-exit"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_outputs_are_published_says_so_every_time(tmp_path, tiny_ckpt,
                                                                     where, signame):
    """A signal that lands after the command finished (its handlers put back, or Python
    already exiting) gets the same line and status as one that lands while the outputs are
    published: never a KeyboardInterrupt traceback and exit 0. Delivered deterministically
    at each of those two moments."""
    src = tiny_ckpt("llama")
    out = tmp_path / "B"
    res = subprocess.run([sys.executable, "-c", LATE, where, signame, "apply", str(src),
                          str(out), "--random", "1"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "COLUMNS": "200"})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    num = getattr(signal, signame)
    assert res.returncode == 128 + num, (res.returncode, res.stderr)
    assert lines == [f"error: interrupted by {signame} after the outputs were written; they "
                     f"are complete: {out}"], res.stderr
    assert (out / "model.safetensors").exists() and _temporaries(tmp_path) == []
