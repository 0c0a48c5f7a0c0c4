"""The third hostile sweep (issue 28): GGUF files whose structure lies, GGUF metadata that
contradicts the tensors, quantised layouts without a schema, verify on NaN/Inf outputs.

Each refusal: exit 2, one ``error:`` line naming the value and the rule, nothing written,
inputs byte-identical (:func:`tests.test_hostile_formats.refused`). The GGUF files are tiny
llama models written as llama.cpp's converter writes them (:func:`write_tiny_gguf`), then
damaged byte by byte where the sweep damaged them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gaugefix.group import SignedPerm
from gaugefix.quant.gguf_file import copy_fields
from gaugefix.testing import write_tiny_gguf
from gaugefix.tiny import build_tiny

from .test_hostile_formats import refused

D = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny llama GGUF file with Q8_0 and Q4_0 tensors, the same model as a checkpoint
    directory)."""
    root = tmp_path_factory.mktemp("tinygguf")
    m = build_tiny("llama", seed=0, hidden_size=D, vocab_size=96, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    m.save_pretrained(root / "hf")
    path = write_tiny_gguf(root / "t.gguf", m, quantise={"attn_q.weight": "Q8_0",
                                                           "ffn_down.weight": "Q4_0"})
    return path, root / "hf"


@pytest.fixture
def world(tmp_path, tiny) -> Path:
    shutil.copy(tiny[0], tmp_path / "t.gguf")
    SignedPerm.identity(D).save(tmp_path / "id.json")
    return tmp_path


# ---------------------------------------------------------------------------- GGUF bytes
def _info_at(raw: bytes, name: str, what: str) -> int:
    """Byte offset of one field of ``name``'s tensor-info entry."""
    key = name.encode()
    at = raw.find(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    return {"ndim": at, "dim0": at + 4, "type": at + 4 + 8 * n_dims,
            "offset": at + 4 + 8 * n_dims + 4}[what]


def _value_at(path: Path, key: str) -> int:
    f = gguf.GGUFReader(path).fields[key]
    return f.offset + 8 + len(key.encode()) + 4


def _patch(raw: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(raw)
    out[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(out)


def _rewrite(src: Path, dst: Path, drop: str | None = None, keep_tensors: bool = True) -> None:
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    copy_fields(r, w)
    for t in r.tensors if keep_tensors else ():
        if t.name != drop:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape,
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _damage(path: Path, case: str) -> None:
    raw = path.read_bytes()
    n_tensors = struct.unpack_from("<Q", raw, 8)[0]
    if case == "count-one-too-low":
        raw = _patch(raw, 8, "<Q", n_tensors - 1)
    elif case == "offset-wraps":
        raw = _patch(raw, _info_at(raw, "blk.0.attn_k.weight", "offset"), "<Q", 2**64 - 1)
    elif case == "q4_0-relabelled-q8_0":
        raw = _patch(raw, _info_at(raw, "blk.0.ffn_down.weight", "type"), "<I", 8)
    elif case == "unknown-type":
        raw = _patch(raw, _info_at(raw, "blk.0.attn_norm.weight", "type"), "<I", 999)
    elif case == "zero-dimension":
        raw = _patch(raw, _info_at(raw, "blk.0.attn_norm.weight", "dim0"), "<Q", 0)
    elif case == "nine-dimensions":
        raw = _patch(raw, _info_at(raw, "blk.0.attn_norm.weight", "ndim"), "<I", 9)
    elif case == "array-of-2^50":
        at = _value_at(path, "tokenizer.ggml.token_type")
        raw = _patch(_patch(raw, at, "<I", 0), at + 4, "<Q", 2**50)
    elif case == "metadata-count-2^40":
        raw = _patch(raw, 16, "<Q", 2**40)
    elif case == "truncated-data":
        raw = raw[:-1000]
    elif case == "bytes-after-the-last-tensor":
        raw += b"\x01" * 4096
    path.write_bytes(raw)


STRUCTURE = {
    "count-one-too-low": "belong to no tensor",
    "offset-wraps": "is at data offset 18446744073709551615",
    "q4_0-relabelled-q8_0": "is its type or shape wrong?",
    "unknown-type": "GGML type 999",
    "zero-dimension": "every dimension must be at least 1",
    "nine-dimensions": "declares 9 dimensions",
    "array-of-2^50": "declares 1125899906842624 entries",
    "metadata-count-2^40": "declares 1099511627776 metadata entries",
    "truncated-data": "the file is truncated",
    "bytes-after-the-last-tensor": "4096 bytes after its last tensor",
}


@pytest.mark.parametrize("case", list(STRUCTURE))
def test_a_gguf_whose_structure_lies_is_refused_before_any_read(world, cli, case):
    """Counts, lengths, types, shapes and offsets held against the file and each other,
    before gguf-py's reader trusts them: each damage is one error line, whatever reads."""
    src = world / "t.gguf"
    _damage(src, case)
    for args in (["inspect", src], ["fingerprint", src],
                 ["apply", src, world / "out.gguf", "--random", "1"]):
        line = refused(cli, world, args, str(src), STRUCTURE[case])
        assert "not a well-formed GGUF file" in line


def test_the_structural_check_passes_every_file_gguf_py_writes(tiny, tmp_path):
    """Every layout the real writer makes holds: quantised and float tensors, no tensors,
    another alignment, a big-endian file."""
    from gaugefix.quant.gguf_check import check_structure

    check_structure(tiny[0])
    for kw in ({}, {"endianess": gguf.GGUFEndian.BIG}):
        path = tmp_path / f"x{len(kw)}.gguf"
        w = gguf.GGUFWriter(path, "llama", **kw)
        w.add_custom_alignment(64)
        w.add_array("a", [1, 2, 3])
        w.add_array("s", ["x", "yy", ""])
        w.add_tensor("f", np.arange(10, dtype=np.float32))
        w.add_tensor("q", gguf.quants.quantize(np.ones((3, 64), np.float32),
                                               gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("g", np.arange(7, dtype=np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        check_structure(path)
        gguf.GGUFReader(path)  # and gguf-py agrees it is a file


METADATA = {  # key: (value, what the error says)
    "llama.attention.head_count": (0, "ZeroDivisionError"),
    "llama.attention.head_count_kv": (0, "ZeroDivisionError"),
    "llama.embedding_length": (63, "not a multiple of the number of attention heads"),
}


@pytest.mark.parametrize("key", list(METADATA))
def test_gguf_metadata_no_model_can_have_is_refused(world, cli, key):
    src = world / "t.gguf"
    value, said = METADATA[key]
    src.write_bytes(_patch(src.read_bytes(), _value_at(src, key), "<I", value))
    for args in (["inspect", src], ["identify", src, src],
                 ["verify", src, src, "--gauge", world / "id.json"]):
        line = refused(cli, world, args, str(src), "does not describe a model", said)
        assert "Traceback" not in line


def test_gguf_tensors_the_metadata_contradicts_are_refused(world, cli):
    """A missing tensor, an I32 weight, a shape other than the metadata's model, no tensors
    at all: the config-against-tensors check that checkpoint directories get, naming the
    GGUF file and the tensors."""
    src = world / "t.gguf"
    cases = {}
    _rewrite(src, world / "missing.gguf", drop="blk.1.ffn_down.weight")
    cases["missing.gguf"] = "1 tensor the metadata's model needs is missing " \
                            "(blk.1.ffn_down.weight)"
    _rewrite(src, world / "empty.gguf", keep_tensors=False)
    cases["empty.gguf"] = "tensors the metadata's model needs are missing"
    raw = src.read_bytes()
    (world / "i32.gguf").write_bytes(
        _patch(raw, _info_at(raw, "blk.0.attn_norm.weight", "type"), "<I", 26))
    cases["i32.gguf"] = "blk.0.attn_norm.weight is I32, not a float or quantised type"
    (world / "kv4.gguf").write_bytes(
        _patch(raw, _value_at(src, "llama.attention.head_count_kv"), "<I", 4))
    cases["kv4.gguf"] = "blk.0.attn_k.weight has shape [32, 64] where the metadata's model has " \
                        "[64, 64]"
    for name, said in cases.items():
        path = world / name
        for args in (["inspect", path], ["apply", path, world / "o.gguf", "--random", "1"],
                     ["verify", path, path, "--gauge", world / "id.json"]):
            line = refused(cli, world, args, str(path), said)
            assert "config.json" not in line and "its metadata contradicts its tensors" in line


def test_a_split_gguf_part_is_refused(world, cli):
    src = world / "t.gguf"
    part = world / "m-00001-of-00002.gguf"
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(part, "llama")
    copy_fields(r, w)
    w.add_uint16("split.no", 0)
    w.add_uint16("split.count", 2)
    w.add_int32("split.tensors.count", len(r.tensors))
    for t in r.tensors[:5]:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(cli, world, ["inspect", part], str(part), "part 1 of 2 of a split GGUF model",
            "llama-gguf-split --merge")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_a_device_named_gguf_is_never_opened(world, cli):
    """A FIFO blocks whoever opens it until a writer comes: it is refused from its stat."""
    fifo = world / "pipe.gguf"
    os.mkfifo(fifo)
    (world / "zero.gguf").symlink_to("/dev/zero")
    refused(cli, world, ["inspect", fifo], str(fifo), "not a regular file (a FIFO)")
    refused(cli, world, ["inspect", world / "zero.gguf"], "not a regular file (a character "
            "device)")
    refused(cli, world, ["transport", "imatrix", fifo, "--model", world / "t.gguf",
                         "--gauge", world / "id.json", "-o", world / "o.gguf"],
            str(fifo), "not a regular file (a FIFO); expected a GGUF importance matrix")


def _imatrix(path: Path, columns: int) -> None:
    """An importance matrix as llama-imatrix writes one, for blk.0.attn_q of ``columns``."""
    w = gguf.GGUFWriter(path, "imatrix")
    w.add_type("imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, columns), np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.ones((1, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_transport_imatrix_refuses_a_model_file_and_a_truncated_matrix(world, cli):
    src = world / "t.gguf"
    refused(cli, world, ["transport", "imatrix", src, "--model", src, "--gauge",
                         world / "id.json", "-o", world / "o.gguf"],
            "is not an importance matrix", "architecture 'llama'")
    im = world / "im.gguf"
    _imatrix(im, D)
    whole = im.read_bytes()
    im.write_bytes(whole[:-40])
    refused(cli, world, ["transport", "imatrix", im, "--model", src, "--gauge",
                         world / "id.json", "-o", world / "o.gguf"], str(im), "truncated")
    wrong = world / "wide.gguf"  # computed for a model of another width
    _imatrix(wrong, 2 * D)
    refused(cli, world, ["transport", "imatrix", wrong, "--model", src, "--gauge",
                         world / "id.json", "-o", world / "o.gguf"],
            "blk.0.attn_q.weight.in_sum2 has 128 columns, its tensor 64")


# ---------------------------------------------------------------------------- verify
def _with_inf(src: Path, dst: Path, key: str) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    sd[key][0, 0] = float("inf")
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("side", ["A", "B"])
def test_verify_fails_on_nan_or_inf_in_either_model(tmp_path, tiny, cli, side):
    """A running max drops NaN (max(0, nan) is 0): the comparison counts non-finite values
    per model and output; the check fails (exit 1), the verdict names them, and --json
    writes null errors with the reason (valid JSON)."""
    good = tiny[1]
    bad = _with_inf(good, tmp_path / "bad", "model.layers.1.mlp.down_proj.weight")
    SignedPerm.identity(D).save(tmp_path / "id.json")
    a, b = (bad, good) if side == "A" else (good, bad)
    res = cli("verify", a, b, "--gauge", tmp_path / "id.json", ok=False)
    assert res.exit_code == 1, res.output
    assert "FAIL: NaN or Inf in the outputs" in res.stdout and f"in {side}" in res.stdout
    res = cli("verify", a, b, "--gauge", tmp_path / "id.json", "--json", ok=False)
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["passed"] is False and doc["max_rel_err"] is None
    assert doc["logits_rel_err"] is None
    assert doc["hidden_rel_err"][0] == 0.0 and doc["hidden_rel_err"][-1] is None
    assert any(r.startswith("logits:") and f"in {side}" in r for r in doc["nonfinite"])
    # and each output of the comparison: an Inf in one hidden state only
    from gaugefix.model import open_model
    from gaugefix.verify import compare_models

    A, B = open_model(good).load(), open_model(good).load()
    ids = torch.arange(16).reshape(2, 8)
    clean = compare_models(A, B, SignedPerm.identity(D), ids, 1e-4)
    assert clean.passed and not clean.nonfinite
    with torch.no_grad():
        B.model.embed_tokens.weight[3, 5] = float("nan")
    rep = compare_models(A, B, SignedPerm.identity(D), ids, 1e-4)
    assert not rep.passed and rep.nonfinite[0].startswith("logits:")
    assert any(r.startswith("hidden_states[0]:") for r in rep.nonfinite)


# ---------------------------------------------------------------------------- quantised
QUANT = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def qbase(tmp_path_factory) -> dict[str, Path]:
    from .test_quant_hf_checkpoint import build

    root = tmp_path_factory.mktemp("qbase")
    return {f: build(root, f) for f in ("gptq", "gptq-act-order", "awq", "fp8-block",
                                        "ct-int-group")}


def _variant(qbase, root: Path, fmt: str, tensors=None, config=None, raw=None) -> Path:
    d = root / "q"
    shutil.copytree(qbase[fmt], d)
    if tensors is not None:
        sd = load_file(d / "model.safetensors")
        tensors(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    if config is not None:
        cfg["quantization_config"].update(config)
    if raw is not None:
        cfg["quantization_config"] = raw
    (d / "config.json").write_text(json.dumps(cfg).replace('"NAN"', "NaN")
                                   .replace('"BIG"', "1e400"))
    return d


def _set(name: str, f):
    return lambda sd: sd.__setitem__(f"{QUANT}.{name}", f(sd[f"{QUANT}.{name}"]))


def _first(value: int):
    return lambda t: torch.where(torch.arange(len(t)) == 0, value, t).to(t.dtype)


LAYOUTS = {  # case: (format, tensors, config, raw config, what the error says)
    "gptq-qweight-float32": ("gptq", _set("qweight", lambda t: t.float()), None, None,
                             "qweight is F32; the gptq layout stores it as I32"),
    "gptq-qweight-int16": ("gptq", _set("qweight", lambda t: t.to(torch.int16)), None, None,
                           "qweight is I16"),
    "gptq-scales-int32": ("gptq", _set("scales", lambda t: t.to(torch.int32)), None, None,
                          "scales is I32"),
    "gptq-scales-one-group-short": ("gptq", _set("scales", lambda t: t[:-1].clone()), None,
                                    None, "has shape [4, 16]; the layout and quantization_config "
                                    "make it [3, 16]"),
    "g_idx-99": ("gptq-act-order", _set("g_idx", _first(99)), None, None,
                 "g_idx: holds groups 0..99; its scales have 4"),
    "g_idx-minus-1": ("gptq-act-order", _set("g_idx", _first(-1)), None, None,
                      "holds groups -1..3"),
    "g_idx-2^31-1": ("gptq-act-order", _set("g_idx", _first(2**31 - 1)), None, None,
                     "holds groups 0..2147483647"),
    "g_idx-not-the-grid": ("gptq", _set("g_idx", lambda t: t.flip(0).clone()), None, None,
                           "is not the grid of group_size 32 and desc_act is false"),
    "fp8-scale-missing": ("fp8-block", lambda sd: sd.pop(f"{QUANT}.weight_scale_inv"), None,
                          None, f"{QUANT} lacks weight_scale_inv"),
    "fp8-scale-0-columns": ("fp8-block", _set("weight_scale_inv", lambda t: t[:, :0].clone()),
                            None, None, "weight_scale_inv has shape [2, 0]"),
    "ct-weight_shape-lies": ("ct-int-group", _set("weight_shape", lambda t: torch.tensor(
        [128, 999], dtype=t.dtype)), None, None, "weight_shape says [128, 999]"),
    "bits-8": ("gptq", None, {"bits": 8}, None, "qweight has shape [32, 128]; the layout"),
    "bits-NaN": ("gptq", None, {"bits": "NAN"}, None, "bits is nan; it must be an integer"),
    "group_size-1e400": ("gptq", None, {"group_size": "BIG"}, None, "group_size is inf"),
    "group_size-0": ("gptq", None, {"group_size": 0}, None, "group_size is 0"),
    "group_size-minus-1": ("gptq", None, {"group_size": -1}, None,
                           "g_idx is not the grid of group_size -1 and desc_act is false"),
    "group_size-2^40": ("gptq", None, {"group_size": 2**40}, None,
                        "group_size is 1099511627776"),
    "awq-group_size-128-vs-32": ("awq", None, {"group_size": 128}, None,
                                 "qzeros has shape [8, 16]; the layout and "
                                 "quantization_config make it [2, 16]"),
    "fp8-block-128-vs-64": ("fp8-block", None, {"weight_block_size": [128, 128]}, None,
                            "down_proj.weight_scale_inv has shape [2, 4]; the layout "
                            "and quantization_config make it [1, 2]"),
    "fp8-block-0": ("fp8-block", None, {"weight_block_size": [0, 0]}, None,
                    "weight_block_size is [0, 0]; it must be two positive integers"),
    "fp8-block-1d": ("fp8-block", None, {"weight_block_size": [128]}, None,
                     "weight_block_size is [128]"),
    "fp8-block-negative": ("fp8-block", None, {"weight_block_size": [-128, 128]}, None,
                           "weight_block_size is [-128, 128]"),
    "config-a-string": ("gptq", None, None, "gptq", "quantization_config is a str"),
    "config-a-list": ("gptq", None, None, ["gptq"], "quantization_config is a list"),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_a_quantised_layout_that_breaks_its_schema_is_refused_at_open(qbase, tmp_path, cli,
                                                                      case):
    fmt, tensors, config, raw, said = LAYOUTS[case]
    d = _variant(qbase, tmp_path, fmt, tensors, config, raw)
    for args in (["inspect", d], ["fingerprint", d],
                 ["apply", d, tmp_path / "out", "--random", "1"]):
        refused(cli, tmp_path, args, said)


def test_every_layout_the_formats_write_holds_its_schema(qbase):
    """The schema refuses nothing the formats' own packing writes."""
    from gaugefix.model import open_model

    for fmt, path in qbase.items():
        m = open_model(path).check()
        assert m.hf_quant is not None and m.hf_quant.groups, fmt


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_merge_reads_a_quantised_input_through_the_model_handle(qbase, tmp_path, fmt):
    """A merge with a GPTQ or AWQ input never goes through transformers' quantised loading
    (which needs optimum or autoawq, and refused GPTQ here): every tensor is read dequantised
    from the handle and the float module is built from the config alone. A with an exactly
    re-gauged copy of itself, aligned, is A's dequantised weights, and transformers loads
    the merged float checkpoint."""
    from transformers import AutoModelForCausalLM

    from gaugefix import jobs
    from gaugefix.model import open_model

    from .test_quant_hf_checkpoint import EXACT

    src = qbase[fmt]
    g = EXACT[fmt]()
    jobs.apply(src, tmp_path / "b", g)
    out = tmp_path / "merged"
    res = jobs.merge(src, tmp_path / "b", out, g, weight=0.5)
    assert res["dequantised"] and res["aligned"]
    a = open_model(src)
    merged = load_file(out / "model.safetensors")
    for key in a.plan:
        assert torch.equal(merged[key], a.tensor(key).float()), key
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(loaded.state_dict()[key], a.tensor(key).float())


def test_a_weight_file_that_is_a_looping_link_is_one_error(tmp_path, tiny, cli):
    """Path.resolve raises RuntimeError on a link loop (the overlap check of the outputs used
    it): canonicalize printed a traceback. Now every command says what the file is."""
    src = tmp_path / "loop"
    shutil.copytree(tiny[1], src)
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("model.safetensors")
    for args in (["canonicalize", src, tmp_path / "c"], ["apply", src, tmp_path / "o",
                                                          "--random", "1"], ["inspect", src]):
        refused(cli, tmp_path, args, "model.safetensors: cannot be read (Too many levels of "
                "symbolic links)")


def test_transport_prints_counts_and_apply_help_names_gguf(world, cli):
    """One summary line (the gauge and its record are in the output file, not on stdout);
    apply's help says a model and its output may be GGUF files."""
    im = world / "im.gguf"
    _imatrix(im, D)
    SignedPerm.random(D, seed=2).save(world / "g.json")
    res = cli("transport", "imatrix", im, "--model", world / "t.gguf", "--gauge",
              world / "g.json", "-o", world / "moved.gguf")
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "entries 1, moved 1" in lines[0] and "perm" not in lines[0]
    text = " ".join(cli("apply", "--help").stdout.split())
    assert "GGUF" in text and ".gguf" in text
