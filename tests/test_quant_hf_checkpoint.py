"""Checkpoints in Hugging Face quantised formats as models: apply, fingerprint, verify,
inspect (gaugefix.quant.hf_checkpoint).

Tiny Llama checkpoints are quantised on disk with the fixture builders of
``test_quant_hf`` (the formats' own packing) and a realistic ``quantization_config``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gaugefix import jobs
from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm
from gaugefix.model import open_model
from gaugefix.quant import hf
from gaugefix.quant.hf_checkpoint import read_record
from tests.test_quant_hf import awq_build, ct_build, fp8_block_build, gptq_build, group_gauge

D, FF, GROUP = 128, 256, 32
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _ct_config(group: int) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                "group_size": group, "actorder": None}}}}


# format -> (quantization_config, build(w) -> stored tensors by role)
FORMATS = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
              "sym": False, "checkpoint_format": "gptq"},
             lambda w: gptq_build(w, GROUP, False)[1]),
    "gptq-act-order": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                        "desc_act": True, "sym": False, "checkpoint_format": "gptq"},
                       lambda w: gptq_build(w, GROUP, True, seed=int(w.shape[1]))[1]),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm",
             "zero_point": True}, lambda w: awq_build(w, GROUP)[1]),
    "ct-int-group": (_ct_config(GROUP), lambda w: ct_build(w, GROUP)[1]),
    "fp8-block": ({"quant_method": "fp8", "activation_scheme": "dynamic",
                   "weight_block_size": [64, 64]}, lambda w: fp8_block_build(w, 64)[1]),
}
# a gauge each format moves exactly: groups (FP8: 64-tiles) kept whole, signs by whole group
# where the codes are asymmetric (act-order GPTQ: any permutation, no signs)
EXACT = {
    "gptq": lambda: group_gauge(D, GROUP, seed=3, whole_group_signs=True),
    "gptq-act-order": lambda: SignedPerm.random(D, seed=3, kind="perm"),
    "awq": lambda: group_gauge(D, GROUP, seed=3, whole_group_signs=True),
    "ct-int-group": lambda: group_gauge(D, GROUP, seed=3, whole_group_signs=True),
    "fp8-block": lambda: group_gauge(D, 64, seed=3, signed=True),
}


def build(root: Path, fmt: str, seed: int = 0, float_copy: Path | None = None) -> Path:
    """A two-layer Llama (d=128) with every decoder Linear quantised in ``fmt``
    (``float_copy``: also the float checkpoint it was quantised from)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    qc, quantise = FORMATS[fmt]
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    sd: dict[str, torch.Tensor] = {}
    flt: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key.endswith("norm.weight"):  # distinct gains: the canonical chart is unique
            t = 1 + 0.5 * torch.rand(t.shape, generator=gen)
        flt[key] = t
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.split("layers.")[-1].split(".", 1)[-1] in LINEARS:
            for role, v in quantise(t.float()).items():
                sd[f"{module}.{role}"] = v.contiguous()
        else:
            sd[key] = t.contiguous()
    if float_copy is not None:
        float_copy.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in flt.items()},
                  str(float_copy / "model.safetensors"), metadata={"format": "pt"})
        (float_copy / "config.json").write_text(json.dumps(cfg.to_dict()))
    path = root / fmt
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfq")
    return {fmt: build(root, fmt) for fmt in FORMATS}


def _expect(a, b, gauge, requantised: set[str]) -> None:
    """Every logical tensor of B is A's moved, bit for bit, unless recorded requantised."""
    ma, mb = open_model(a), open_model(b)
    assert mb.shapes == ma.shapes
    for key, op in ma.plan.items():
        target = op(gauge, ma.tensor(key))
        got = mb.tensor(key)
        if key in requantised:
            assert not torch.equal(got, target), key
        else:
            assert torch.equal(got, target), key


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_model_presents_logical_tensors(ckpts, fmt):
    m = open_model(ckpts[fmt]).check()
    q = m.hf_quant
    assert q is not None and q.name == fmt
    assert m.quantised == {fmt: 2 * len(LINEARS)}
    assert m.shapes["model.layers.0.self_attn.q_proj.weight"] == (D, D)
    assert m.shapes["model.layers.1.mlp.down_proj.weight"] == (D, FF)
    assert str(m.plan["model.layers.0.mlp.up_proj.weight"]) == "H(1)"
    assert str(m.plan["model.layers.0.self_attn.o_proj.weight"]) == "H(0)"
    key = "model.layers.1.mlp.gate_proj.weight"
    w = m.tensor(key)
    assert w.dtype == torch.float32 and tuple(w.shape) == (FF, D)
    assert torch.equal(m.slice(key, (slice(0, 3), slice(5, 9))), w[:3, 5:9])
    assert torch.equal(w, hf.dequantise(q.scheme, {n: m.stored_tensor(n)
                                                   for n in q.groups[key].values()}))
    rep = jobs.inspect(m)
    assert rep is not None


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_apply_exact_and_random(ckpts, fmt, tmp_path):
    src = ckpts[fmt]
    # a gauge the format moves exactly: every tensor is the input's moved, bit for bit
    g = EXACT[fmt]()
    res = jobs.apply(src, tmp_path / "exact", g, progress=False)
    assert res.report.requantised == []
    _expect(src, tmp_path / "exact", g, set())
    rec = read_record(tmp_path / "exact" / "model.safetensors")
    moving = sum(op.residual_axis is not None for op in open_model(src).plan.values())
    assert rec["requantised"] == [] and rec["exact"] == moving
    # a random signed gauge: the readers' cells that cannot move are requantised, recorded
    r = SignedPerm.random(D, seed=11)
    res = jobs.apply(src, tmp_path / "random", r, progress=False)
    names = {t["tensor"] for t in res.report.requantised}
    assert names and all(t["how"] == "requantised" and t["error"] > 0
                         for t in res.report.requantised)
    # integer formats: only readers of the residual stream (writers move rows whole);
    # FP8 tiles run along both axes
    readers = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert {n.rsplit(".", 2)[-2] for n in names} <= (
        readers | {"o_proj", "down_proj"} if fmt == "fp8-block" else readers)
    _expect(src, tmp_path / "random", r, names)
    out = tmp_path / "random"
    rec = read_record(out / "model.safetensors")
    assert {t["tensor"] for t in rec["requantised"]} == names
    # names, dtypes and shapes kept (but for a GPTQ g_idx, none changes)
    from safetensors import safe_open

    with safe_open(src / "model.safetensors", "pt") as fa, \
            safe_open(out / "model.safetensors", "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for k in fa.keys():  # noqa: SIM118
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, k
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":  # columns moved with g_idx: the kernels must read it
        assert qc["desc_act"] is True
    else:
        assert qc == FORMATS[fmt][0]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fingerprint_and_verify(ckpts, fmt, tmp_path):
    src = ckpts[fmt]
    g = EXACT[fmt]()
    out = tmp_path / "b"
    jobs.apply(src, out, g, progress=False)
    fa, fb = jobs.fingerprint(src), jobs.fingerprint(out)
    assert fa.fingerprint == fb.fingerprint and fa.sha256 == fb.sha256
    assert fa.tensors == fb.tensors
    rep = jobs.verify(src, out, g, n_tokens=16)
    assert rep.tensors is not None and {t["how"] for t in rep.tensors} == {"exact"}
    assert rep.passed and rep.differs == []
    if fmt.startswith("gptq") or fmt == "awq":  # their kernels' libraries are not here
        assert rep.forward is not None and "\n" not in rep.forward
        assert fmt.split("-")[0] in rep.forward
    else:  # transformers runs compressed-tensors and fine-grained FP8 on the CPU
        assert rep.forward is None and rep.n_tokens == 16 and rep.max_rel_err <= rep.tol
    # a random gauge: requantised tensors are B = move(A) byte for byte
    r = SignedPerm.random(D, seed=11)
    jobs.apply(src, tmp_path / "r", r, progress=False)
    rep = jobs.verify(src, tmp_path / "r", r, n_tokens=16)
    assert rep.requantised > 0 and rep.differs == [] and rep.passed
    # the wrong gauge: tensors differ, verify fails
    rep = jobs.verify(src, tmp_path / "r", g, n_tokens=16)
    assert rep.differs and not rep.passed


def test_unsupported_method_is_one_line(ckpts, tmp_path):
    bad = tmp_path / "bnb"
    bad.mkdir()
    for f in ckpts["awq"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (bad / "config.json").write_text(json.dumps(cfg))
    for job in (lambda: jobs.inspect(bad),
                lambda: jobs.apply(bad, tmp_path / "o", SignedPerm.random(D, seed=1),
                                   progress=False),
                lambda: jobs.fingerprint(bad)):
        with pytest.raises(GaugefixError) as err:
            job()
        assert "'bitsandbytes'" in str(err.value) and "\n" not in str(err.value)


def test_unknown_integer_tensor_is_still_refused(ckpts, tmp_path):
    """The scheme's own integer tensors move with it; a stray integer tensor on a signed
    residual axis is refused as in a float checkpoint."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "stray"
    src.mkdir()
    for f in ckpts["awq"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    sd = load_file(src / "model.safetensors")
    sd["lm_head.weight"] = torch.ones(96, D, dtype=torch.int8)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(GaugefixError, match=r"integer tensor lm_head\.weight"):
        jobs.apply(src, tmp_path / "o", SignedPerm.random(D, seed=1), progress=False)


def test_sharded_checkpoint_with_a_group_across_shards(ckpts, tmp_path):
    """Two shards and an index, one Linear's qweight in one shard and its scales in the
    other: the group is read across shards, each shard written with its own names."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "sharded"
    src.mkdir()
    (src / "config.json").write_bytes((ckpts["gptq"] / "config.json").read_bytes())
    sd = load_file(ckpts["gptq"] / "model.safetensors")
    split = "model.layers.0.self_attn.q_proj.scales"
    first = {k: v for k, v in sd.items() if "layers.1." in k or k == split}
    rest = {k: v for k, v in sd.items() if k not in first}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {}
    for name, part in zip(names, (first, rest), strict=True):
        save_file(part, str(src / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    g = SignedPerm.random(D, seed=21)
    res = jobs.apply(src, tmp_path / "out", g, progress=False)
    out = tmp_path / "out"
    assert res.report.shards == 2
    _expect(src, out, g, {t["tensor"] for t in res.report.requantised})
    for name, part in zip(names, (first, rest), strict=True):
        assert set(load_file(out / name)) == set(part)
        assert read_record(out / name) == read_record(out / names[0])
    assert (out / "model.safetensors.index.json").read_text() == \
        (src / "model.safetensors.index.json").read_text()


def test_canonicalize_and_cli_verify(ckpts, tmp_path, cli):
    """canonicalize writes the canonical chart (requantised tensors said); the CLI's verify
    says in one line why the forward pass did not run, and passes on the tensors."""
    src = ckpts["awq"]
    chart = jobs.canonicalize(src, tmp_path / "canon")
    _expect(src, tmp_path / "canon", chart.gauge,
            {t["tensor"] for t in chart.requantised})
    assert read_record(tmp_path / "canon" / "model.safetensors")["chart"] == "canonical"
    g = EXACT["awq"]()
    jobs.apply(src, tmp_path / "b", g, progress=False)
    g.save(tmp_path / "g.json")
    res = cli("verify", src, tmp_path / "b", "--gauge", tmp_path / "g.json", "--tokens", 8)
    assert "transformers cannot run awq here" in res.output and "PASS" in res.output


@pytest.mark.parametrize("fmt", ["gptq", "awq", "ct-int-group", "fp8-block"])
def test_identify_names_the_quantisation_against_the_float_original(tmp_path, fmt):
    """A quantised checkpoint against the float checkpoint it was quantised from (in another
    chart): derived, the same network up to that quantisation; against the float weights
    with noise far above the rounding: derived by the test, not "up to quantisation"."""
    src = tmp_path / "float"
    q = build(tmp_path, fmt, seed=4, float_copy=src)
    g = SignedPerm.random(D, 8)
    moved = tmp_path / "float-moved"
    jobs.apply(src, moved, g)
    ident = jobs.identify(moved, q)
    assert ident.verdict == "derived", ident.reason
    assert f"up to {fmt}" in ident.reason and ident.evidence["quantisation"]["within"]
    assert ident.gauge == g.inverse()
    noisy = tmp_path / "noisy"
    m = open_model(src)
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    state = {k: m.tensor(k) + (0.3 * m.tensor(k).std() * torch.randn(
        m.shapes[k], generator=gen) if k.endswith("proj.weight") else 0) for k in m.shapes}
    noisy.mkdir()
    save_file(state, str(noisy / "model.safetensors"), metadata={"format": "pt"})
    (noisy / "config.json").write_text((src / "config.json").read_text())
    other = jobs.identify(noisy, q)
    assert not other.evidence["quantisation"]["within"], other.reason
    assert "up to" not in other.reason
