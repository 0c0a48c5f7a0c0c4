"""Bad input: a clear one-line error, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gaugefix.group import SignedPerm


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def llama(tiny_ckpt):
    return tiny_ckpt("llama", seed=0)


def _expect_error(cli, tmp_path, args, message, code=2):
    before = _listing(tmp_path)
    res = cli(*args, ok=False)
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert message in lines[0], lines[0]
    assert _listing(tmp_path) == before  # nothing written, no temporary left behind
    return lines[0]


def test_unknown_family(tmp_path, cli, llama):
    cfg = json.loads((llama / "config.json").read_text())
    cfg["model_type"] = "bert"
    (llama / "config.json").write_text(json.dumps(cfg))
    line = _expect_error(cli, tmp_path, ["apply", llama, tmp_path / "B", "--random", 1],
                         "unsupported family: model_type 'bert'")
    assert "llama" in line and "gpt2" in line  # lists what is supported


def test_unknown_key(tmp_path, cli, llama):
    sd = load_file(llama / "model.safetensors")
    sd["model.layers.0.adapter.weight"] = torch.zeros(4, 64)
    save_file(sd, llama / "model.safetensors", metadata={"format": "pt"})
    _expect_error(cli, tmp_path, ["apply", llama, tmp_path / "B", "--random", 1],
                  "match no rule of the architecture map: model.layers.0.adapter.weight;")


def test_width_mismatch(tmp_path, cli, llama):
    SignedPerm.random(32, seed=0).save(tmp_path / "g32.json")
    _expect_error(cli, tmp_path, ["apply", llama, tmp_path / "B", "--gauge", tmp_path / "g32.json"],
                  "width mismatch: the gauge has d=32")


def test_tensor_width_mismatch_names_the_tensor(tmp_path, cli, llama):
    sd = load_file(llama / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(60, 128)
    save_file(sd, llama / "model.safetensors", metadata={"format": "pt"})
    _expect_error(cli, tmp_path, ["apply", llama, tmp_path / "B", "--random", 1],
                  "model.layers.1.mlp.down_proj.weight has shape [60, 128]")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "not valid JSON"),
        ('{"format": "something/1"}', "not a gauge file"),
        (json.dumps({"format": "gaugefix.gauge/1", "convention": "x_B[i] = sign[i] * "
                     "x_A[perm[i]]", "d": 64, "perm": [0] * 64, "sign": [1] * 64}), "missing"),
        ("[1, 2, 3]", "must hold a JSON object"),
    ],
)
def test_malformed_gauge_file(tmp_path, cli, llama, content, message):
    (tmp_path / "g.json").write_text(content)
    _expect_error(cli, tmp_path, ["apply", llama, tmp_path / "B", "--gauge", tmp_path / "g.json"],
                  message)


def test_output_exists_is_refused_unless_overwrite(tmp_path, cli, llama):
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "keep.txt").write_text("mine")
    _expect_error(cli, tmp_path, ["apply", llama, tmp_path / "B", "--random", 1],
                  "already exists (pass --overwrite")
    cli("apply", llama, tmp_path / "B", "--random", 1, "--overwrite")
    assert not (tmp_path / "B" / "keep.txt").exists()
    assert (tmp_path / "B" / "model.safetensors").exists()


def test_existing_gauge_out_is_refused_before_anything_is_written(tmp_path, cli, llama):
    (tmp_path / "g.json").write_text("{}")
    _expect_error(cli, tmp_path, ["apply", llama, tmp_path / "B", "--random", 1, "--gauge-out",
                                  tmp_path / "g.json"], "already exists")


def test_output_inside_input_is_refused(tmp_path, cli, llama):
    _expect_error(cli, tmp_path, ["apply", llama, llama / "sub", "--random", 1],
                  "lies inside the input")


def test_per_coordinate_signs_on_layernorm_are_refused(tmp_path, cli, tiny_ckpt):
    gpt2 = tiny_ckpt("gpt2")
    SignedPerm.random(64, seed=0, positive_fraction=0.5).save(tmp_path / "g.json")
    line = _expect_error(cli, tmp_path,
                         ["apply", gpt2, tmp_path / "B", "--gauge", tmp_path / "g.json"],
                         "S_d×{±1}")
    assert "per-coordinate signs would change the function" in line
    # a permutation with a global sign is fine
    SignedPerm(np.random.default_rng(0).permutation(64), -np.ones(64, int)).save(
        tmp_path / "global.json")
    cli("apply", gpt2, tmp_path / "B", "--gauge", tmp_path / "global.json")


def test_gauge_source_must_be_given_once(tmp_path, cli, llama):
    SignedPerm.random(64, seed=0).save(tmp_path / "g.json")
    _expect_error(cli, tmp_path, ["apply", llama, tmp_path / "B"], "exactly one of")
    _expect_error(cli, tmp_path, ["apply", llama, tmp_path / "B", "--random", 1, "--gauge",
                                  tmp_path / "g.json"], "exactly one of")


def test_missing_checkpoint(tmp_path, cli):
    _expect_error(cli, tmp_path, ["inspect", tmp_path / "nope"], "not found")


def test_verify_fails_with_the_wrong_gauge(tmp_path, cli, llama):
    cli("apply", llama, tmp_path / "B", "--random", 1, "--gauge-out", tmp_path / "g.json")
    SignedPerm.load(tmp_path / "g.json").unsigned().save(tmp_path / "unsigned.json")
    res = cli("verify", llama, tmp_path / "B", "--gauge", tmp_path / "unsigned.json", ok=False)
    assert res.exit_code == 1 and "FAIL" in res.stdout


def test_console_script_exit_status(tmp_path, llama):
    """The installed entry point itself: one line on stderr, exit 2."""
    exe = Path(sys.executable).with_name("gaugefix")
    env = {**os.environ, "COLUMNS": "40"}  # a narrow terminal must not wrap the error
    res = subprocess.run([str(exe), "apply", str(llama), str(tmp_path / "B")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error:")
    assert not (tmp_path / "B").exists()


def test_hub_id_without_network_is_a_clear_error(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _listing(tmp_path)
    res = cli("inspect", "some-org/some-model-that-is-not-cached", ok=False)
    assert res.exit_code == 2
    assert "not a local directory, and not in the local Hugging Face cache" in res.stderr
    assert _listing(tmp_path) == before
