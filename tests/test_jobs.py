"""One opened model per input, one library call per job: each command's files equal what its
job in :mod:`gaugefix.jobs` writes, and each input is opened once per command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from gaugefix import jobs
from gaugefix.apply import gauge_model
from gaugefix.checkpoint import Checkpoint
from gaugefix.group import SignedPerm
from gaugefix.tiny import build_tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("pair")
    a = build_tiny("llama", seed=0)
    a.save_pretrained(w / "A")
    g = SignedPerm.random(64, seed=1)
    gauge_model(a, g).save_pretrained(w / "B")
    gauge_model(a, SignedPerm.random(64, seed=2)).save_pretrained(w / "C")
    g.save(w / "g.json")
    np.save(w / "ids.npy", np.random.default_rng(0).integers(0, 128, 512))
    claim = {"format": "gaugefix.claim/1", "layer": 1, "source": str(w / "A"),
             "concept": {"positive": [[5, 6, 7]], "negative": [[5, 6, 8]]},
             "coordinates": [{"index": 3, "sign": 1}, {"index": 9, "sign": -1}]}
    (w / "claim.json").write_text(json.dumps(claim))
    return w


def _tree(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


TOKENS = ["--tokens-from", "ids.npy", "--tokens", 512]

# command line → the same job through the Python API, each writing into the folder it is given
JOBS = {
    "match": (["match", "A", "B", "--source", "weights", "-o", "{out}"],
              lambda w, out: jobs.match(w / "A", w / "B", source="weights").save(out)),
    "match-activations": (
        ["match", "A", "B", "--source", "activations", "-o", "{out}", *TOKENS],
        lambda w, out: jobs.match(w / "A", w / "B", source="activations", opts=_opts(w)
                                  ).save(out)),
    "trajectory": (["trajectory", "A", "B", "C", "--source", "weights", "-o", "{out}"],
                   lambda w, out: jobs.trajectory([w / "A", w / "B", w / "C"],
                                                  source="weights").save(out)),
    "apply": (["apply", "A", "{out}", "--random", 3],
              lambda w, out: jobs.apply(w / "A", out, random=3)),
    "canonicalize": (["canonicalize", "A", "{out}"],
                     lambda w, out: jobs.canonicalize(w / "A", out)),
    "audit": (["audit", "claim.json", "B", "--gauges", 1, "-o", "{out}", *TOKENS],
              lambda w, out: jobs.audit(w / "claim.json", [w / "B"], gauges=1, opts=_opts(w)
                                        ).save(out)),
    "merge": (["merge", "A", "B", "--gauge", "g.json", "-o", "{out}"],
              lambda w, out: jobs.merge(w / "A", w / "B", out, w / "g.json")),
    "transport": (["transport", "neurons", "neurons.json", "--gauge", "g.json", "-o", "{out}"],
                  lambda w, out: jobs.transport("neurons", w / "neurons.json", out,
                                                w / "g.json")),
}


def _opts(w: Path):
    from gaugefix.estimate import StatsOptions

    return StatsOptions(tokens=str(w / "ids.npy"), n_tokens=512)


@pytest.mark.parametrize("name", JOBS)
def test_a_command_writes_what_its_job_writes(name, pair, tmp_path, cli, monkeypatch):
    (pair / "neurons.json").write_text(json.dumps([{"index": 3, "score": 1.5}]))
    argv, job = JOBS[name]
    monkeypatch.chdir(pair)
    suffix = ".json" if name in ("match", "match-activations", "trajectory", "audit",
                                 "transport") else ""
    by_cli, by_api = tmp_path / f"cli{suffix}", tmp_path / f"api{suffix}"
    cli(*[str(a).format(out=by_cli) for a in argv])
    job(pair, by_api)
    a, b = _tree(by_cli), _tree(by_api)
    if name in ("match", "match-activations", "trajectory"):  # names of the inputs as given
        da, db = json.loads(by_cli.read_text()), json.loads(by_api.read_text())
        for doc in (da, db):
            for side in ("source", "target"):
                doc[side]["name"] = Path(doc[side]["name"]).name
            for step in doc.get("steps", []):
                step["from"], step["to"] = Path(step["from"]).name, Path(step["to"]).name
        assert da == db
    elif name == "audit":
        da, db = json.loads(by_cli.read_text()), json.loads(by_api.read_text())
        for doc in (da, db):
            doc["source"] = Path(doc["source"]).name
            doc["claim"] = Path(doc["claim"]).name
            for r in doc["rows"]:
                r["model"] = Path(r["model"]).name
        assert da == db
    elif name == "transport":  # the record names the gauge file as given
        da, db = json.loads(by_cli.read_text()), json.loads(by_api.read_text())
        assert [{k: v for k, v in e.items() if k != "gaugefix"} for e in da] == \
            [{k: v for k, v in e.items() if k != "gaugefix"} for e in db]
    else:
        assert a == b


# ---------------------------------------------------------------------------- opens
OPENS = {
    "inspect": (["inspect", "A"], 1),
    "fingerprint": (["fingerprint", "A"], 1),
    "canonicalize": (["canonicalize", "A", "{out}"], 1),
    "identify": (["identify", "A", "C"], 2),
    "apply": (["apply", "A", "{out}", "--random", 1, "--gauge-out", "{out}.json"], 1),
    "verify": (["verify", "A", "B", "--gauge", "g.json"], 2),
    "match-weights": (["match", "A", "B", "--source", "weights", "-o", "{out}"], 2),
    "match": (["match", "A", "B", "-o", "{out}", *TOKENS], 2),
    "stats": (["stats", "A", "B", "-o", "{out}", *TOKENS], 2),
    "trajectory": (["trajectory", "A", "B", "C", "-o", "{out}", *TOKENS], 3),
    "audit": (["audit", "claim.json", "A", "B", "--gauges", 1, *TOKENS], 2),
    "merge": (["merge", "A", "B", "--gauge", "g.json", "-o", "{out}"], 2),
}


@pytest.mark.parametrize("name", OPENS)
def test_each_input_is_opened_once(name, pair, tmp_path, cli, monkeypatch):
    argv, expected = OPENS[name]
    opened: list[str] = []
    real = Checkpoint.open.__func__

    def counting(cls, model):
        opened.append(str(model))
        return real(cls, model)

    monkeypatch.setattr(Checkpoint, "open", classmethod(counting))
    monkeypatch.chdir(pair)
    cli(*[str(a).format(out=tmp_path / "out") for a in argv])
    assert len(opened) == expected, opened


def test_a_model_in_memory_and_its_checkpoint_give_one_estimate(pair):
    from transformers import AutoModelForCausalLM

    b = AutoModelForCausalLM.from_pretrained(pair / "B")
    on_disk = jobs.match(pair / "A", pair / "B", source="weights")
    mixed = jobs.match(pair / "A", b, source="weights")
    assert on_disk.gauge == mixed.gauge
    assert mixed.metadata["target"] == {"name": type(b).__name__}


# ---------------------------------------------------------------------------- the CLI layer
def test_a_misspelt_input_or_output_fails_when_the_command_is_declared():
    from typing import Annotated

    import typer

    from gaugefix.cli import command

    def cmd(model: Annotated[str, typer.Argument()], output: Path) -> None:
        pass

    with pytest.raises(TypeError, match="modle"):
        command(inputs=("modle",), outputs=("output",))(cmd)
    with pytest.raises(TypeError, match="outptu"):
        command(inputs=("model",), outputs=("outptu",))(cmd)


def test_the_cli_holds_no_estimation_or_loading():
    """cli.py imports the jobs, never the estimation, loading or checkpoint modules."""
    import ast

    import gaugefix.cli

    tree = ast.parse(Path(gaugefix.cli.__file__).read_text())
    imported = {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"estimate", "stats", "checkpoint", "model", "layerwise", "match",
                           "canonical", "apply", "audit"}, imported
