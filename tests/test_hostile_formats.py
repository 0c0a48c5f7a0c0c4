"""Hostile objects and inputs of unbounded size (issue 19): damaged Gemma Scope archives,
folders holding two layouts, 0-d tensors, integer tensors on a signed axis, and inputs that
must be read in bounded memory (a large text corpus for 1024 tokens, /dev/zero wherever a
small file is expected). Each refusal: exit 2, one ``error:`` line naming the value and the
rule, nothing written, inputs byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm
from gaugefix.transport import transport

from .test_interp_formats import (
    _ck_state,
    _clt,
    _dl_state,
    _gemmascope_arrays,
    _gemmascope_folder,
    _v2_single,
)

D = 64
G = SignedPerm.random(D, seed=5, positive_fraction=0.5)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "other" for p in sorted(root.rglob("*"))}


def refused(cli, root: Path, args: list[object], *messages: str) -> str:
    before = _snapshot(root)
    res = cli(*args, ok=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for m in messages:
        assert m in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert _snapshot(root) == before  # no output, no temporary, inputs byte-identical
    return lines[0]


@pytest.fixture
def gauge_file(tmp_path: Path) -> Path:
    G.save(tmp_path / "g.json")
    return tmp_path / "g.json"


# ---------------------------------------------------------------------------- Gemma Scope
def _corrupt_member(path: Path, member: str) -> None:
    """Flip one byte in the middle of ``member``'s stored data (its CRC no longer holds)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28],
                                         "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _short_member(path: Path) -> None:
    """A valid zip whose W_enc.npy header promises [64, 96] float32 but holds half of it."""
    arrays = _gemmascope_arrays()
    with zipfile.ZipFile(path, "w") as z:
        for name, arr in arrays.items():
            import io

            buf = io.BytesIO()
            np.save(buf, arr)
            data = buf.getvalue()
            if name == "W_enc":
                data = data[: len(data) // 2]
            z.writestr(f"{name}.npy", data)


@pytest.mark.parametrize("damage", ["bad-crc", "bad-crc-compressed", "short-member",
                                    "truncated-file"])
def test_damaged_gemmascope_npz_is_refused_before_writing(tmp_path, cli, gauge_file, damage):
    src = _gemmascope_folder(tmp_path, _gemmascope_arrays(), compressed=damage.endswith(
        "compressed"), sub="gs")
    npz = src / "params.npz"
    if damage.startswith("bad-crc"):
        _corrupt_member(npz, "W_dec.npy")
        message = "not a readable .npz file"
    elif damage == "short-member":
        _short_member(npz)
        message = "member W_enc.npy holds"
    else:
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
        message = "not a readable .npz file"
    line = refused(cli, tmp_path, ["transport", "gemmascope", src, "--gauge", gauge_file,
                                   "-o", tmp_path / "out"], str(npz), message)
    if damage == "short-member":
        assert "its header says [64, 96] float32" in line


# ---------------------------------------------------------------------------- two layouts
def _gs_both(root: Path) -> Path:
    src = _gemmascope_folder(root, _gemmascope_arrays(), sub="gs")
    save_file(_v2_single(skip=False), str(src / "params.safetensors"))
    return src


def _gs_single_and_multi(root: Path) -> Path:
    src = root / "gs2"
    src.mkdir()
    save_file(_v2_single(skip=False), str(src / "params.safetensors"))
    save_file(_v2_single(skip=False), str(src / "params_layer_0.safetensors"))
    return src


def _cc_both(root: Path) -> Path:
    src = root / "cc"
    src.mkdir()
    torch.save(_ck_state(), src / "cc_weights.pt")
    save_file(_dl_state(), str(src / "model.safetensors"))
    return src


def _clt_both(root: Path) -> Path:
    src, _ = _clt(root / "clt", n=2)
    t = {"W_enc": torch.zeros(24, D), "W_dec": torch.zeros(24, D), "b_enc": torch.zeros(24),
         "b_dec": torch.zeros(D)}
    save_file(t, str(src / "layer_0.safetensors"))
    return src


TWO_LAYOUTS = {
    "gemmascope-npz-and-safetensors": ("gemmascope", _gs_both,
                                       "Gemma Scope (params.npz) and Gemma Scope 2 "
                                       "(params.safetensors)"),
    "gemmascope-single-and-multi": ("gemmascope", _gs_single_and_multi,
                                    "Gemma Scope 2 (params.safetensors) and Gemma Scope 2 "
                                    "multi-layer (params_layer_0.safetensors)"),
    "crosscoder": ("crosscoder", _cc_both, "ckkissane (cc_weights.pt) and dictionary_learning "
                   "(model.safetensors)"),
    "clt": ("clt", _clt_both, "cross-layer transcoder (W_enc_0.safetensors, "
            "W_enc_1.safetensors, W_dec_0.safetensors, …) and per-layer transcoder set "
            "(layer_0.safetensors)"),
}


@pytest.mark.parametrize("case", TWO_LAYOUTS.values(), ids=TWO_LAYOUTS)
def test_a_folder_with_two_layouts_is_refused(tmp_path, cli, gauge_file, case):
    kind, build, names = case
    src = build(tmp_path)
    refused(cli, tmp_path, ["transport", kind, src, "--gauge", gauge_file, "-o",
                            tmp_path / "out"], f"{kind}: {src} holds two layouts at once, "
            f"{names}", "keep one layout per folder")


# ---------------------------------------------------------------------------- 0-d tensors
@pytest.mark.parametrize("layout", ["ckkissane", "dictionary_learning"])
def test_a_0d_crosscoder_encoder_is_refused(tmp_path, cli, gauge_file, layout):
    if layout == "ckkissane":
        state, marker = {**_ck_state(), "W_enc": torch.tensor(1.0)}, "W_enc"
    else:
        state, marker = {**_dl_state(), "encoder.weight": torch.tensor(1.0)}, "encoder.weight"
    torch.save(state, tmp_path / "cc.pt")
    refused(cli, tmp_path, ["transport", "crosscoder", tmp_path / "cc.pt", "--gauge",
                            gauge_file, "-o", tmp_path / "o.pt"],
            f"tensor {marker} has shape [], expected its slots on axis 0")


def test_a_0d_gain_fails_the_width_check():
    """check_width covers every axis of every op: a 0-d gain (G, axis 0) is refused."""
    from gaugefix.arch import Op, check_width

    for op in (Op("G"), Op("LB"), Op("H", 0), Op("HH")):
        with pytest.raises(GaugefixError, match=r"model.norm.weight has shape \[\]"):
            check_width("model.norm.weight", (), (op,), D)


# ---------------------------------------------------------------------------- integer dtypes
@pytest.mark.parametrize("dtype", ["I8", "U8", "I32", "BOOL", "int8", "torch.uint8",
                                   "torch.qint8"])
def test_check_dtype_refuses_integers_on_signed_axes(dtype):
    from gaugefix.arch import Op, check_dtype, dtype_name

    with pytest.raises(GaugefixError, match=rf"integer tensor W \({dtype_name(dtype)}\) lies "
                                            "on a signed residual axis"):
        check_dtype("W", dtype, (Op("H", 1),), G)
    check_dtype("W", dtype, (Op("G"),), G)  # a gather is exact on integers
    check_dtype("W", dtype, (), G)  # untouched
    check_dtype("W", dtype, (Op("H", 1),), G.unsigned())  # no sign flips


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F8_E4M3", torch.float16, np.float32])
def test_check_dtype_passes_floats(dtype):
    from gaugefix.arch import Op, check_dtype

    check_dtype("W", dtype, (Op("H", 1),), G)


def test_integer_objects_are_refused_in_the_transport_tables(tmp_path, cli, gauge_file):
    arrays = {**_gemmascope_arrays(), "W_dec": np.ones((96, D), np.int8)}
    src = _gemmascope_folder(tmp_path, arrays, sub="gs")
    refused(cli, tmp_path, ["transport", "gemmascope", src, "--gauge", gauge_file, "-o",
                            tmp_path / "out"], "integer tensor W_dec (int8) lies on a signed")
    cc = {**_ck_state(), "b_dec": torch.ones(2, D, dtype=torch.uint8)}
    torch.save(cc, tmp_path / "cc.pt")
    refused(cli, tmp_path, ["transport", "crosscoder", tmp_path / "cc.pt", "--gauge",
                            gauge_file, "-o", tmp_path / "o.pt"],
            "integer tensor b_dec (uint8) lies on a signed")
    src, _ = _clt(tmp_path / "clt", n=2)
    save_file({"W_dec_1": torch.ones(24, 1, D, dtype=torch.int8)},
              str(src / "W_dec_1.safetensors"))
    refused(cli, tmp_path, ["transport", "clt", src, "--gauge", gauge_file, "-o",
                            tmp_path / "out"], "integer tensor W_dec_1 (int8)")


# ---------------------------------------------------------------------------- bounded reads
MiB = 1 << 20


def _peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> tuple[Path, object]:
    from gaugefix.demo.corpus import Corpus

    corpus = Corpus()
    path = tmp_path_factory.mktemp("tok")
    corpus.tokenizer().save_pretrained(path)
    return path, corpus


@pytest.mark.parametrize("lines", [True, False], ids=["lines", "one-line"])
def test_a_large_corpus_is_streamed_for_a_few_tokens(tmp_path, tokenizer_dir, lines):
    """1024 tokens from a 64 MiB corpus: read and tokenised only as far as they need (the
    whole file would be 64 MiB of text at once, and far more as a Python str)."""
    from gaugefix.stats import load_token_source

    tok_dir, corpus = tokenizer_dir
    words = [w for w in corpus.vocab if not w.startswith("<")][:50]
    line = " ".join(words[i % len(words)] for i in range(40)) + ("\n" if lines else " ")
    path = tmp_path / "corpus.txt"
    with open(path, "w") as f:
        block = line * 1000
        while f.tell() < 64 * MiB:
            f.write(block)
    load_token_source(path, vocab_size=corpus.vocab_size, n_tokens=8, tokenizer_dir=tok_dir)
    ids, peak = _peak(lambda: load_token_source(path, vocab_size=corpus.vocab_size,
                                                n_tokens=1024, tokenizer_dir=tok_dir))
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert len(ids) == 1024
    want = corpus.tokenizer()(line.strip() if lines else (line * 30).strip(),
                              add_special_tokens=False)["input_ids"]
    assert ids[:40].tolist() == want[:40]  # the same ids as tokenising the text itself


def test_token_ids_are_sliced_not_read_whole(tmp_path):
    """A .npy of ids is mapped and sliced (numpy's allocations are traced)."""
    from gaugefix.stats import load_token_source

    np.save(tmp_path / "ids.npy", np.arange(16 * MiB // 8, dtype=np.int64) % 100)
    ids, peak = _peak(lambda: load_token_source(tmp_path / "ids.npy", vocab_size=100,
                                                n_tokens=1024))
    assert ids.tolist() == [i % 100 for i in range(1024)]
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_torch_token_ids_are_mapped_not_read_whole(tmp_path):
    """A .pt of ids (torch's allocations are not traced: the resident-set high-water mark of
    a fresh process, before and after) is mapped and sliced."""
    import subprocess
    import sys

    torch.save(torch.arange(128 * MiB // 8) % 100, tmp_path / "ids.pt")
    code = ("import resource, sys\n"
            "from gaugefix.stats import load_token_source\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "ids = load_token_source(sys.argv[1], vocab_size=100, n_tokens=1024)\n"
            "assert ids.tolist() == [i % 100 for i in range(1024)]\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ids.pt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown_kib = int(out.stdout.strip().splitlines()[-1])
    assert grown_kib < 32 * 1024, f"resident set grew by {grown_kib / 1024:.0f} MiB"


@pytest.fixture
def small_world(tmp_path, monkeypatch) -> Path:
    from gaugefix.tiny import build_tiny

    build_tiny("llama", seed=0).save_pretrained(tmp_path / "A")
    G.save(tmp_path / "g.json")
    (tmp_path / "n.json").symlink_to("/dev/zero")
    (tmp_path / "c.json").symlink_to("/dev/zero")
    monkeypatch.chdir(tmp_path)
    return tmp_path


ZERO_READERS = {
    "gauge": (["apply", "A", "out", "--gauge", "/dev/zero"], "/dev/zero", "gauge file"),
    "compare": (["compare", "g.json", "/dev/zero"], "/dev/zero", "gauge file"),
    "neurons": (["transport", "neurons", "n.json", "--gauge", "g.json", "-o", "o.json"],
                "n.json", "neuron list"),
    "claim": (["audit", "c.json", "A", "--gauges", 1], "c.json", "claim file"),
    "tokens": (["stats", "A", "A", "-o", "s.safetensors", "--tokens-from", "/dev/zero"],
               "/dev/zero", "token source"),
}


@pytest.mark.parametrize("case", ZERO_READERS.values(), ids=ZERO_READERS)
def test_dev_zero_is_refused_in_bounded_memory(small_world, cli, case):
    argv, name, what = case
    line, peak = _peak(lambda: refused(cli, small_world, argv))
    assert f"{name}: not a regular file (a character device); expected a {what}" in line
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_bounded_reader_directly(tmp_path):
    from gaugefix.io import read_bytes, read_json, read_text

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(GaugefixError, match="not a regular file \\(a FIFO\\); expected a x"):
        read_text(tmp_path / "fifo", "x")  # refused without opening it: never blocks
    (tmp_path / "ok.json").write_text(json.dumps({"a": 1}))
    assert read_json(tmp_path / "ok.json", "x", limit=100) == {"a": 1}
    with pytest.raises(GaugefixError, match=r"ok\.json: 8 bytes, more than the 4 bytes a x may"):
        read_json(tmp_path / "ok.json", "x", limit=4)
    assert read_bytes(tmp_path / "ok.json", "x", 8) == b'{"a": 1}'
    with pytest.raises(GaugefixError, match="is a directory; expected a x"):
        read_text(tmp_path, "x")
    with pytest.raises(GaugefixError, match="x not found"):
        read_text(tmp_path / "nope", "x")


def test_moved_objects_still_work_after_the_checks(tmp_path, gauge_file):
    """The planning checks are not a narrowing: a float Gemma Scope archive still moves and
    comes back byte for byte."""
    src = _gemmascope_folder(tmp_path, _gemmascope_arrays(), compressed=True, sub="gs")
    transport("gemmascope", src, tmp_path / "B", G)
    transport("gemmascope", tmp_path / "B", tmp_path / "A2", G, inverse=True)
    assert (tmp_path / "A2" / "params.npz").read_bytes() == (src / "params.npz").read_bytes()
