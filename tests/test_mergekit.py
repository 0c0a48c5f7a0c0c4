"""mergekit as a real client of ``gaugefix merge --export-aligned``.

gaugefix puts B into A's chart; mergekit, through its YAML entry point (the ``mergekit-yaml``
console script a user runs), then merges A with that export. Where both define the method
(linear, slerp, task arithmetic) mergekit's merge equals gaugefix's own, tensor by tensor;
and the alignment is what makes the merge meaningful: A merged with a re-gauged copy of
itself gives back A only after alignment.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import mergekit  # a test dependency: the Makefile installs it (no skip when it is missing)
import pytest
import torch
import yaml
from safetensors.torch import load_file

from gaugefix.group import SignedPerm
from gaugefix.tiny import build_tiny

D = 64
W = 0.3  # the weight of B (mergekit: its linear and task_arithmetic weight, slerp's t)


def mergekit_yaml(config: dict[str, Any], out: Path) -> None:
    """Run mergekit's YAML entry point, as a user would, on ``config``."""
    exe = Path(sys.executable).with_name("mergekit-yaml")
    cmd = [str(exe)] if exe.is_file() else [shutil.which("mergekit-yaml") or "mergekit-yaml"]
    cfg = out.with_suffix(".yml")
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": os.environ.get("GAUGEFIX_TEST_THREADS", "2")}
    res = subprocess.run([*cmd, str(cfg), str(out), "--no-copy-tokenizer", "--quiet",
                          "--no-write-model-card"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, f"mergekit-yaml failed:\n{res.stdout}\n{res.stderr}"


def linear(a: Path, b: Path, w: float) -> dict[str, Any]:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(a), "parameters": {"weight": 1 - w}},
                       {"model": str(b), "parameters": {"weight": w}}]}


def slerp(a: Path, b: Path, t: float) -> dict[str, Any]:
    return {"merge_method": "slerp", "dtype": "float32", "base_model": str(a),
            "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"t": t}}


def task_arithmetic(base: Path, a: Path, b: Path, w: float) -> dict[str, Any]:
    """base + (A − base) + w·(B − base): gaugefix's task-arithmetic."""
    return {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(base),
            "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                       {"model": str(b), "parameters": {"weight": w}}]}


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(shard))
    assert out, f"no safetensors in {ckpt}"
    return out


def assert_same_checkpoint(got: Path, want: Path, *, exact: bool = False) -> None:
    """The same tensors (names, shapes, dtypes), equal to float32 rounding of the arithmetic
    (mergekit blends in float32, gaugefix in float64, both store float32)."""
    x, y = tensors(got), tensors(want)
    assert x.keys() == y.keys()
    for k in y:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        if exact:
            assert torch.equal(x[k], y[k]), k
        else:
            torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6, msg=k)


IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def logits(ckpt: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(IDS).logits
    assert torch.isfinite(out).all()
    return out


@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> Path:
    """A common base (a tiny Llama), A and B-native (two fine-tune-sized steps from it, in
    its chart) and B (B-native saved in another chart, ``g-true.json``)."""
    from gaugefix.apply import gauge_model

    root = tmp_path_factory.mktemp("mergekit")
    base = build_tiny("llama", seed=0)
    base.save_pretrained(root / "base")
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # ~30% steps per tensor: far from collinear for slerp
        for p in (*a.parameters(), *b.parameters()):
            p.add_(0.3 * p.pow(2).mean().sqrt() * torch.randn(p.shape, generator=gen))
    a.save_pretrained(root / "A")
    b.save_pretrained(root / "B-native")
    g = SignedPerm.random(D, seed=11)
    g.save(root / "g-true.json")
    gauge_model(b, g).save_pretrained(root / "B")
    return root


def test_mergekit_on_export_equals_gaugefix_merge(lineage, tmp_path, cli):
    """mergekit's linear, slerp and task arithmetic of A with ``merge --export-aligned``'s B
    equal gaugefix's own merge of A and B; the export is B-native exactly; the merged models
    load and agree."""
    a, b, g = lineage / "A", lineage / "B", lineage / "g-true.json"
    # B really is in another chart: comparing it with A coordinate by coordinate is meaningless
    assert not torch.equal(tensors(b)["model.embed_tokens.weight"],
                           tensors(lineage / "B-native")["model.embed_tokens.weight"])
    cli("merge", a, b, "--gauge", g, "-o", tmp_path / "gf-linear", "--method", "linear",
        "--weight", W, "--export-aligned", tmp_path / "B-in-A")
    cli("merge", a, b, "--gauge", g, "-o", tmp_path / "gf-slerp", "--method", "slerp",
        "--weight", W)
    cli("merge", a, b, "--gauge", g, "-o", tmp_path / "gf-task-arithmetic", "--method",
        "task-arithmetic", "--weight", W, "--base", lineage / "base")
    assert_same_checkpoint(tmp_path / "B-in-A", lineage / "B-native", exact=True)

    mergekit_yaml(linear(a, tmp_path / "B-in-A", W), tmp_path / "mk-linear")
    mergekit_yaml(slerp(a, tmp_path / "B-in-A", W), tmp_path / "mk-slerp")
    mergekit_yaml(task_arithmetic(lineage / "base", a, tmp_path / "B-in-A", W),
                  tmp_path / "mk-task-arithmetic")
    for method in ("linear", "slerp", "task-arithmetic"):
        assert_same_checkpoint(tmp_path / f"mk-{method}", tmp_path / f"gf-{method}")
        cfg = json.loads((tmp_path / f"mk-{method}" / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == D
        torch.testing.assert_close(logits(tmp_path / f"mk-{method}"),
                                   logits(tmp_path / f"gf-{method}"), rtol=1e-4, atol=1e-4)
    # three different merges (slerp is not linear here: the tensors are far from collinear)
    heads = [tensors(tmp_path / f"mk-{m}")["lm_head.weight"]
             for m in ("linear", "slerp", "task-arithmetic")]
    assert not any(torch.allclose(x, y, atol=1e-4) for x, y in itertools.combinations(heads, 2))


def test_mergekit_after_alignment_gives_back_a(lineage, tmp_path, cli):
    """A merged by mergekit with a re-gauged exact copy of A: after gaugefix's alignment
    (the gauge estimated by ``match``, not given) linear and slerp give back A; fed the copy
    as it is, mergekit averages unrelated coordinates and the logits are far from A's."""
    a = lineage / "A"
    cli("apply", a, tmp_path / "C", "--random", 21, "--gauge-out", tmp_path / "h-true.json")
    cli("match", a, tmp_path / "C", "-o", tmp_path / "h.json", "--source", "weights")
    assert SignedPerm.load(tmp_path / "h.json") == SignedPerm.load(tmp_path / "h-true.json")
    cli("merge", a, tmp_path / "C", "--gauge", tmp_path / "h.json", "-o", tmp_path / "gf",
        "--export-aligned", tmp_path / "C-in-A")
    assert_same_checkpoint(tmp_path / "C-in-A", a, exact=True)

    mergekit_yaml(linear(a, tmp_path / "C-in-A", 0.5), tmp_path / "aligned-linear")
    mergekit_yaml(slerp(a, tmp_path / "C-in-A", 0.5), tmp_path / "aligned-slerp")
    mergekit_yaml(linear(a, tmp_path / "C", 0.5), tmp_path / "unaligned-linear")
    ref = logits(a)
    for merged in ("aligned-linear", "aligned-slerp"):
        assert_same_checkpoint(tmp_path / merged, a)
        torch.testing.assert_close(logits(tmp_path / merged), ref, rtol=1e-5, atol=1e-5)
    gap = (logits(tmp_path / "unaligned-linear") - ref).abs().max()
    assert gap > 0.2 * ref.abs().max(), (float(gap), float(ref.abs().max()))  # ~0.8 here


def test_mergekit_is_the_real_package() -> None:
    """The client under test is mergekit itself, with its YAML entry point installed."""
    from mergekit.config import MergeConfiguration

    assert Path(mergekit.__file__).parent.name == "mergekit"
    MergeConfiguration.model_validate(linear(Path("A"), Path("B"), W))
    MergeConfiguration.model_validate(slerp(Path("A"), Path("B"), W))
