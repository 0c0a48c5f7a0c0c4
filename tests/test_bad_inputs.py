"""Bad and adversarial input, every command × each class: exit 2, one ``error:`` line naming
the value and the rule, no output left behind, every input byte-identical afterwards, and no
file ever unpickled.

Each case builds its bad input inside a fresh copy of a small world (tiny checkpoints, a
gauge, an SAE, a LoRA adapter, neuron lists, a claim, statistics, optimizer state), runs the
command in-process and compares a hash of every file of the world before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from gaugefix.group import SignedPerm


class Evil:
    """A pickle that would write a file if it were ever loaded with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


# ---------------------------------------------------------------------------- the world
@pytest.fixture(scope="module")
def base_world(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    from gaugefix.apply import gauge_model
    from gaugefix.testing import make_optimizer, save_saelens, train_on_batches
    from gaugefix.tiny import build_tiny

    w = tmp_path_factory.mktemp("world")
    a = build_tiny("llama", seed=0)
    a.save_pretrained(w / "A")
    g = SignedPerm.random(64, seed=1)
    g.save(w / "g.json", {"source": {"name": "A"}, "target": {"name": "B"}})
    gauge_model(a, g).save_pretrained(w / "B")
    SignedPerm.random(64, seed=2).save(w / "g2.json", {"source": {"name": "C"},
                                                       "target": {"name": "D"}})
    build_tiny("gpt2", seed=0).save_pretrained(w / "G")
    np.save(w / "ids.npy", np.random.default_rng(0).integers(0, 128, 512))
    torch.manual_seed(0)
    sae = {"W_enc": torch.randn(64, 96), "b_enc": torch.zeros(96),
           "W_dec": torch.randn(96, 64), "b_dec": torch.zeros(64)}
    save_saelens(w / "sae", sae, hook_name="blocks.0.hook_resid_post")
    get_peft_model(build_tiny("llama", seed=0), LoraConfig(
        r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    ).save_pretrained(w / "lora")
    (w / "neurons.json").write_text(json.dumps([{"index": 3, "score": 1.5}]))
    (w / "neurons.csv").write_text("index,score\n3,1.5\n")
    torch.save(torch.randn(64), w / "steer.pt")
    (w / "claim.json").write_text(json.dumps(_claim()))
    opt = make_optimizer(a, 1e-3)
    train_on_batches(a, opt, torch.randint(0, 128, (1, 2, 16)))
    torch.save(opt.state_dict(), w / "optimizer.pt")
    from gaugefix.estimate import StatsOptions, activation_stats

    activation_stats(w / "A", w / "B", StatsOptions(tokens=w / "ids.npy", n_tokens=512)
                     ).save(w / "stats.safetensors")
    return w


def _claim(**changes) -> dict:
    doc = {"format": "gaugefix.claim/1", "layer": 1, "source": "A",
           "concept": {"positive": [[5, 6, 7]], "negative": [[5, 6, 8]]},
           "coordinates": [{"index": 3, "sign": 1}, {"index": 9, "sign": -1}]}
    doc.update(changes)
    return doc


@pytest.fixture
def world(base_world, tmp_path, monkeypatch) -> Path:
    w = tmp_path / "w"
    shutil.copytree(base_world, w)
    monkeypatch.chdir(w)  # relative names in the cases are inside the world
    return w


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------- bad files
def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def evil(p: Path) -> None:
    torch.save({"weight": Evil(p.parent / "PWNED")}, p)


def pickled_bin(model: Path) -> None:
    """Replace a checkpoint's safetensors by a malicious pytorch_model.bin."""
    (model / "model.safetensors").unlink()
    evil(model / "pytorch_model.bin")


def write(path: Path, content: str | bytes) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def patch_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


NESTED = "[" * 100_000 + "]" * 100_000

# Each case: (id, setup(world) -> argv, message expected in the error line). The argv may
# name files the setup created.
Case = tuple[str, Callable[[Path], list], str]

CHECKPOINT_COMMANDS: dict[str, Callable[[Path], list]] = {
    "inspect": lambda w: ["inspect", "A"],
    "apply": lambda w: ["apply", "A", "out", "--random", 1],
    "canonicalize": lambda w: ["canonicalize", "A", "out"],
    "fingerprint": lambda w: ["fingerprint", "A"],
    "identify": lambda w: ["identify", "A", "B", "--json"],
    "verify": lambda w: ["verify", "A", "B", "--gauge", "g.json"],
    "match-weights": lambda w: ["match", "A", "B", "-o", "out.json", "--source", "weights"],
    "match": lambda w: ["match", "A", "B", "-o", "out.json", "--tokens-from", "ids.npy",
                        "--tokens", 512],
    "merge": lambda w: ["merge", "A", "B", "--gauge", "g.json", "-o", "out"],
    "trajectory": lambda w: ["trajectory", "A", "B", "-o", "out.json", "--tokens-from",
                             "ids.npy", "--tokens", 512],
    "audit": lambda w: ["audit", "claim.json", "B", "--gauges", 1, "--tokens-from", "ids.npy",
                        "--tokens", 512],
}


def _checkpoint_cases() -> list[Case]:
    """Each command that reads checkpoint A, with A broken in each way."""
    breakages: dict[str, tuple[Callable[[Path], None], str]] = {
        "truncated-safetensors": (lambda w: truncate(w / "A" / "model.safetensors"),
                                  "not a valid weight shard"),
        "config-is-a-list": (lambda w: write(w / "A" / "config.json", "[1, 2]"),
                             "expected a JSON object (model config), found a list"),
        "config-not-json": (lambda w: write(w / "A" / "config.json", "{nope"), "not valid JSON"),
        "config-binary": (lambda w: write(w / "A" / "config.json", b"\xff\xfe\x00"),
                          "not a UTF-8 text file"),
        "malicious-pytorch-model-bin": (lambda w: pickled_bin(w / "A"), "refused"),
        "no-weights": (lambda w: (w / "A" / "model.safetensors").unlink(), "no weights found"),
        "index-escapes-directory": (lambda w: write(
            w / "A" / "model.safetensors.index.json",
            json.dumps({"weight_map": {"x": "../g.json"}})), "malformed shard index"),
        "missing": (lambda w: shutil.rmtree(w / "A"), "not found"),
    }
    cases = []
    for cmd, argv in CHECKPOINT_COMMANDS.items():
        for name, (breaker, message) in breakages.items():
            if (cmd, name) == ("merge", "malicious-pytorch-model-bin"):
                message = "model A must be a safetensors checkpoint"  # refused before reading
            if cmd in ("inspect", "merge", "apply", "match-weights", "canonicalize",
                       "fingerprint", "identify") or name in (
                    "config-is-a-list", "truncated-safetensors", "malicious-pytorch-model-bin"):
                def setup(w, breaker=breaker, argv=argv):
                    breaker(w)
                    return argv(w)

                if cmd == "audit" and name == "missing":
                    continue  # the claim's source is A: covered by the claim cases
                cases.append((f"{cmd}:{name}", setup, message))
    return cases


def _set(setup: Callable[[Path], None], argv: list) -> Callable[[Path], list]:
    def run(w: Path) -> list:
        setup(w)
        return argv

    return run


def _noop(w: Path) -> None:
    return None


CASES: list[Case] = [
    *_checkpoint_cases(),
    # ------------------------------------------------------------------ numeric options
    ("apply:random-negative", _set(_noop, ["apply", "A", "out", "--random", -1]),
     "Invalid value for '--random': -1 is below the minimum 0"),
    ("apply:positive-fraction", _set(_noop, ["apply", "A", "out", "--random", 1,
                                             "--positive-fraction", 2]),
     "2.0 is above the maximum 1"),
    ("apply:kind", _set(_noop, ["apply", "A", "out", "--random", 1, "--kind", "rotation"]),
     "unknown random gauge kind"),
    ("apply:no-gauge", _set(_noop, ["apply", "A", "out"]), "exactly one of"),
    ("apply:missing-argument", _set(_noop, ["apply", "A"]), "Missing argument"),
    ("apply:unknown-option", _set(_noop, ["apply", "A", "out", "--bogus"]), "No such option"),
    ("verify:tol-negative", _set(_noop, ["verify", "A", "B", "--gauge", "g.json", "--tol", -1]),
     "-1.0 is below the minimum 0"),
    ("verify:tol-nan", _set(_noop, ["verify", "A", "B", "--gauge", "g.json", "--tol", "nan"]),
     "'--tol': nan is not a finite number"),
    ("verify:tokens-zero", _set(_noop, ["verify", "A", "B", "--gauge", "g.json", "--tokens",
                                        0]), "0 is below the minimum 1"),
    ("verify:dtype", _set(_noop, ["verify", "A", "B", "--gauge", "g.json", "--dtype", "int8"]),
     "unknown dtype"),
    ("match:seq-len-zero", _set(_noop, ["match", "A", "B", "-o", "o.json", "--seq-len", 0]),
     "'--seq-len': 0 is below the minimum 1"),
    ("match:batch-size-zero", _set(_noop, ["match", "A", "B", "-o", "o.json", "--batch-size",
                                           0]), "'--batch-size': 0 is below"),
    ("match:device-bogus", _set(_noop, ["match", "A", "B", "-o", "o.json", "--device",
                                        "bogus"]), "unknown device 'bogus'"),
    ("match:device-absent", _set(_noop, ["match", "A", "B", "-o", "o.json", "--device",
                                         "cuda:7"]), "cuda:7"),
    ("match:layers-out-of-range", _set(_noop, ["match", "A", "B", "-o", "o.json",
                                               "--layers=-99"]), "residual positions [-99]"),
    ("match:layers-too-deep", _set(_noop, ["match", "A", "B", "-o", "o.json", "--layers",
                                           "0,3"]), "out of range for 2 layers"),
    ("match:layers-text", _set(_noop, ["match", "A", "B", "-o", "o.json", "--layers", "a,b"]),
     "comma-separated integers"),
    ("match:tokens-too-few", _set(_noop, ["match", "A", "B", "-o", "o.json", "--tokens", 10]),
     "too few tokens"),
    ("match:method", _set(_noop, ["match", "A", "B", "-o", "o.json", "--method", "magic"]),
     "unknown method"),
    ("match:gain-weight", _set(_noop, ["match", "A", "B", "-o", "o.json", "--source",
                                       "weights", "--gain-weight", "nan"]), "finite"),
    ("match:seed-negative", _set(_noop, ["match", "A", "B", "-o", "o.json", "--seed", -3]),
     "'--seed': -3 is below the minimum 0"),
    ("merge:weight-nan", _set(_noop, ["merge", "A", "B", "--gauge", "g.json", "-o", "out",
                                      "--weight", "nan"]), "not a finite number"),
    ("merge:weight-range", _set(_noop, ["merge", "A", "B", "--gauge", "g.json", "-o", "out",
                                        "--weight", 3]), "must lie in 0..1"),
    ("merge:method", _set(_noop, ["merge", "A", "B", "--gauge", "g.json", "-o", "out",
                                  "--method", "ties"]), "unknown merge method"),
    ("merge:different-family", _set(_noop, ["merge", "A", "G", "--unaligned", "-o", "out"]),
     "different families"),
    ("audit:gauges-negative", _set(_noop, ["audit", "claim.json", "B", "--gauges", -1]),
     "'--gauges': -1 is below the minimum 0"),
    ("demo:device", _set(_noop, ["demo", "--device", "tpu", "--out", "d"]), "unknown device"),
    # ------------------------------------------------------------------ statistics files
    ("match:stats-truncated", lambda w: (truncate(w / "stats.safetensors"),
                                         ["match", "A", "B", "-o", "o.json", "--stats",
                                          "stats.safetensors"])[1], "not a valid statistics"),
    *[(f"match:stats-header-{key}", lambda w, key=key, value=value: (
        _forge_stats(w / "stats.safetensors", key, value),
        ["match", "A", "B", "-o", "o.json", "--stats", "stats.safetensors"])[1], message)
      for key, value, message in [
          ("format", None, "not a gaugefix statistics file"),
          ("n", None, "lacks 'n'"), ("n", "{oops", "'n' is not JSON"),
          ("n", "[1]", "'n' must be"), ("n", '{"pooled": -5}', "'n' must be"),
          ("positions", '"abc"', "'positions' must be"),
          ("n_tokens", '"many"', "'n_tokens' must be"), ("meta", "[]", "'meta' must be"),
          ("tensor", None, "lacks tensors")]],
    ("match:stats-missing", _set(_noop, ["match", "A", "B", "-o", "o.json", "--stats",
                                         "nope.safetensors"]), "not found"),
    ("match:stats-with-weights", _set(_noop, ["match", "A", "B", "-o", "o.json", "--stats",
                                              "stats.safetensors", "--source", "weights"]),
     "--stats goes with --source both, activations or pooled"),
    # ------------------------------------------------------------------ token sources
    ("match:tokens-pickle", lambda w: (evil(w / "ids.pt"),
                                       ["match", "A", "B", "-o", "o.json", "--tokens-from",
                                        "ids.pt"])[1], "refused"),
    ("match:tokens-npy-object", lambda w: (np.save(w / "obj.npy", np.array([{}], dtype=object)),
                                           ["match", "A", "B", "-o", "o.json", "--tokens-from",
                                            "obj.npy"])[1], "not a numeric .npy array"),
    ("match:tokens-out-of-vocab", lambda w: (np.save(w / "big.npy", np.full(512, 999)),
                                             ["match", "A", "B", "-o", "o.json",
                                              "--tokens-from", "big.npy", "--tokens", 512])[1],
     "token ids must lie in 0..127"),
    ("match:tokens-negative", lambda w: (np.save(w / "neg.npy", np.full(512, -1)),
                                         ["match", "A", "B", "-o", "o.json", "--tokens-from",
                                          "neg.npy", "--tokens", 512])[1], "token ids must lie"),
    ("match:tokens-float", lambda w: (np.save(w / "f.npy", np.ones(512) / 3),
                                      ["match", "A", "B", "-o", "o.json", "--tokens-from",
                                       "f.npy", "--tokens", 512])[1], "must be integers"),
    ("match:tokens-missing", _set(_noop, ["match", "A", "B", "-o", "o.json", "--tokens-from",
                                          "nope.npy"]), "token source not found"),
    ("match:tokens-text-no-tokenizer", lambda w: (write(w / "t.txt", "hello there"),
                                                  ["match", "A", "B", "-o", "o.json",
                                                   "--tokens-from", "t.txt"])[1],
     "no usable tokenizer"),
    # ------------------------------------------------------------------ gauge files
    *[(f"apply:gauge-{name}", lambda w, content=content: (
        write(w / "bad.json", content), ["apply", "A", "out", "--gauge", "bad.json"])[1], msg)
      for name, content, msg in [
          ("nested", NESTED, "nested too deeply"),
          ("huge-int", json.dumps({**SignedPerm.identity(64).to_json(),
                                   "perm": [10**40, *range(1, 64)]}),
           "perm entries must be integers in 0..63"),
          ("float-sign", json.dumps({**SignedPerm.identity(64).to_json(),
                                     "sign": [0.5] * 64}), "sign entries must be +1 or -1"),
          ("not-json", "{", "not valid JSON"), ("binary", b"\x80\x81", "not a UTF-8 text file"),
          ("list", "[]", "must hold a JSON object"),
          ("d-zero", json.dumps({**SignedPerm.identity(64).to_json(), "d": 0, "perm": [],
                                 "sign": []}), "at least one coordinate"),
          ("wrong-width", json.dumps(SignedPerm.random(32, 0).to_json()), "width mismatch")]],
    ("apply:gauge-is-a-directory", _set(_noop, ["apply", "A", "out", "--gauge", "A"]),
     "is a directory"),
    ("compose:not-chaining", _set(_noop, ["compose", "g.json", "g2.json", "-o", "c.json"]),
     "do not chain"),
    ("compose:width", lambda w: (SignedPerm.random(32, 0).save(w / "g32.json"),
                                 ["compose", "g.json", "g32.json", "-o", "c.json"])[1],
     "gauge widths differ"),
    ("compare:width", lambda w: (SignedPerm.random(32, 0).save(w / "g32.json"),
                                 ["compare", "g.json", "g32.json"])[1], "gauge widths differ"),
    ("invert:missing", _set(_noop, ["invert", "nope.json", "-o", "i.json"]), "not found"),
    # ------------------------------------------------------------------ neurons
    *[(f"neurons:{name}", lambda w, fname=fname, content=content: (
        write(w / fname, content),
        ["transport", "neurons", fname, "--gauge", "g.json", "-o", "out" + Path(fname).suffix]
    )[1], msg) for name, fname, content, msg in [
        ("binary-json", "n.json", b"\x89PNG\x00\x01", "not a UTF-8 text file"),
        ("pt-file", "n.pt", b"\x80\x04", "unknown file type '.pt'"),
        ("index-float", "n.json", json.dumps([{"index": 3.7}]), "must be an integer, got 3.7"),
        ("index-bool", "n.json", json.dumps([{"index": True}]), "must be an integer, got True"),
        ("index-text", "n.csv", "index,score\nx,1\n", "must be an integer, got 'x'"),
        ("index-out-of-range", "n.json", json.dumps([{"index": 64}]), "has index 64"),
        ("index-negative", "n.json", json.dumps([{"index": -1}]), "has index -1"),
        ("score-text", "n.json", json.dumps([{"index": 1, "score": "high"}]),
         "score must be a number, got 'high'"),
        ("score-csv", "n.csv", "index,score\n1,abc\n", "score must be a number, got 'abc'"),
        ("score-list", "n.json", json.dumps([{"index": 1, "score": [1]}]),
         "score must be a number"),
        ("gauge-sign-x", "n.csv", "index,score,gauge_sign\n1,2,x\n",
         "gauge_sign must be an integer, got 'x'"),
        ("gauge-sign-2", "n.json", json.dumps([{"index": 1, "gauge_sign": 2}]),
         "gauge_sign must be 1 or -1"),
        ("no-index", "n.json", json.dumps([{"neuron": 1}]), "has no 'index' field"),
        ("scalar-json", "n.json", "7", "expected a JSON list or object (neuron list)"),
        ("ragged-csv", "n.csv", "index,score\n1,2,3\n", "more fields than the header"),
        ("no-index-column", "n.csv", "neuron,score\n1,2\n", "'index' column")]],
    # ------------------------------------------------------------------ SAE
    ("sae:cfg-list", lambda w: (write(w / "sae" / "cfg.json", "[]"),
                                ["transport", "sae", "sae", "--gauge", "g.json", "-o", "o"])[1],
     "expected a JSON object (SAE config), found a list"),
    ("sae:hook-number", lambda w: (patch_json(w / "sae" / "cfg.json", hook_name=12),
                                   ["transport", "sae", "sae", "--gauge", "g.json", "-o",
                                    "o"])[1], "hook_name must be a hook name (text), got 12"),
    ("sae:metadata-list", lambda w: (patch_json(w / "sae" / "cfg.json", metadata=[1]),
                                     ["transport", "sae", "sae", "--gauge", "g.json", "-o",
                                      "o"])[1], "metadata must be an object"),
    ("sae:truncated", lambda w: (truncate(w / "sae" / "sae_weights.safetensors"),
                                 ["transport", "sae", "sae", "--gauge", "g.json", "-o", "o"])[1],
     "not a valid SAE weights file"),
    ("sae:no-cfg", lambda w: ((w / "sae" / "cfg.json").unlink(),
                              ["transport", "sae", "sae", "--gauge", "g.json", "-o", "o"])[1],
     "has no cfg.json"),
    # ------------------------------------------------------------------ LoRA
    ("lora:config-string", lambda w: (write(w / "lora" / "adapter_config.json", '"LORA"'),
                                      ["transport", "lora", "lora", "--gauge", "g.json", "-o",
                                       "o", "--model", "A"])[1],
     "expected a JSON object (PEFT adapter config), found a string"),
    ("lora:truncated", lambda w: (truncate(w / "lora" / "adapter_model.safetensors"),
                                  ["transport", "lora", "lora", "--gauge", "g.json", "-o", "o",
                                   "--model", "A"])[1], "not a valid adapter weights file"),
    ("lora:pickled", lambda w: ((w / "lora" / "adapter_model.safetensors").unlink(),
                                evil(w / "lora" / "adapter_model.bin"),
                                ["transport", "lora", "lora", "--gauge", "g.json", "-o", "o",
                                 "--model", "A"])[2], "never unpickles"),
    ("lora:family", _set(_noop, ["transport", "lora", "lora", "--gauge", "g.json", "-o", "o",
                                 "--family", "bert"]), "unsupported family"),
    # ------------------------------------------------------------------ steering
    ("steering:pickle", lambda w: (evil(w / "v.pt"),
                                   ["transport", "steering", "v.pt", "--gauge", "g.json", "-o",
                                    "o.pt"])[1], "refused"),
    ("steering:truncated", lambda w: (truncate(w / "steer.pt"),
                                      ["transport", "steering", "steer.pt", "--gauge", "g.json",
                                       "-o", "o.pt"])[1], "not a readable torch file"),
    ("steering:strings", lambda w: (torch.save({"a": "text"}, w / "s.pt"),
                                    ["transport", "steering", "s.pt", "--gauge", "g.json",
                                     "-o", "o.pt"])[1], "is not a vector"),
    ("steering:suffix-change", _set(_noop, ["transport", "steering", "steer.pt", "--gauge",
                                            "g.json", "-o", "o.npy"]), "keep the input's format"),
    ("steering:gguf-garbage", lambda w: (write(w / "c.gguf", b"GGUF" + b"\x00" * 7),
                                         ["transport", "steering", "c.gguf", "--gauge",
                                          "g.json", "-o", "o.gguf"])[1], "not a GGUF file"),
    # ------------------------------------------------------------------ optimizer state
    ("optim:pickle", lambda w: (evil(w / "optimizer.pt"),
                                ["transport", "optim", "optimizer.pt", "--gauge", "g.json",
                                 "-o", "o.pt", "--model", "A"])[1], "refused"),
    ("optim:not-a-state", lambda w: (torch.save({"state": 1, "param_groups": "x"},
                                                w / "optimizer.pt"),
                                     ["transport", "optim", "optimizer.pt", "--gauge", "g.json",
                                      "-o", "o.pt", "--model", "A"])[1],
     "param_groups must be a list"),
    ("optim:unknown-ids", lambda w: (torch.save({"state": {99: {}}, "param_groups": [
        {"params": [0]}]}, w / "optimizer.pt"),
        ["transport", "optim", "optimizer.pt", "--gauge", "g.json", "-o", "o.pt", "--model",
         "A"])[1], "names parameters that no group holds"),
    ("transport:kind", _set(_noop, ["transport", "weights", "steer.pt", "--gauge", "g.json",
                                    "-o", "o.pt"]), "unknown kind 'weights'"),
    # ------------------------------------------------------------------ claims
    *[(f"audit:claim-{name}", lambda w, doc=doc: (
        write(w / "c.json", doc if isinstance(doc, str) else json.dumps(doc)),
        ["audit", "c.json", "B", "--gauges", 1])[1], msg) for name, doc, msg in [
        ("token-out-of-vocab", _claim(concept={"positive": [[5, 999]], "negative": [[1]]}),
         "token id 999, outside the vocabulary"),
        ("token-negative", _claim(concept={"positive": [[5, -2]], "negative": [[1]]}),
         "negative token id -2"),
        ("empty-prompt", _claim(concept={"positive": [[]], "negative": [[1]]}),
         "is an empty prompt"),
        ("empty-text-prompt", _claim(concept={"positive": [" "], "negative": [[1]]}),
         "is an empty prompt"),
        ("direction-strings", _claim(concept={"direction": ["a"] * 64}),
         "direction must be a non-empty list of numbers"),
        ("direction-width", _claim(concept={"direction": [1.0] * 10}),
         "direction has 10 entries"),
        ("concept-list", _claim(concept=[1, 2]), "concept must be an object"),
        ("layer-99", _claim(layer=99), "layer 99 is out of range"),
        ("layer-negative", _claim(layer=-1), "layer must be a residual position"),
        ("layer-text", _claim(layer="one"), "layer must be an integer"),
        ("index-float", _claim(coordinates=[{"index": 1.5}]), "must be an integer, got 1.5"),
        ("index-out-of-range", _claim(coordinates=[{"index": 64}]), "coordinate 64 is out of"),
        ("sign-zero", _claim(coordinates=[{"index": 1, "sign": 0}]), "sign ±1"),
        ("duplicate-index", _claim(coordinates=[{"index": 1}, {"index": 1, "sign": -1}]),
         "name an index twice"),
        ("no-coordinates", _claim(coordinates=[]), "non-empty list"),
        ("no-source", {k: v for k, v in _claim().items() if k != "source"}, "pass --source"),
        ("source-number", _claim(source=5), "source must be a path"),
        ("text-without-tokenizer", _claim(concept={"positive": ["good"], "negative": ["bad"]}),
         "no usable tokenizer"),
        ("wrong-format", {"format": "x"}, "not a claim file"),
        ("list", "[]", "expected a JSON object (claim file), found a list")]],
    ("audit:different-family", _set(_noop, ["audit", "claim.json", "G"]),
     "cannot be compared with the source"),
    # ------------------------------------------------------------------ outputs
    ("apply:output-is-input", _set(_noop, ["apply", "A", "A", "--random", 1, "--overwrite"]),
     "output A is the input A"),
    ("apply:output-inside-input", _set(_noop, ["apply", "A", "A/sub", "--random", 1]),
     "lies inside the input"),
    ("apply:output-contains-input", lambda w: (shutil.copytree(w / "A", w / "outer" / "A"),
                                               ["apply", "outer/A", "outer", "--random", 1,
                                                "--overwrite"])[1], "contains the input"),
    ("apply:gauge-out-inside-output", _set(_noop, ["apply", "A", "out", "--random", 1,
                                                   "--gauge-out", "out/g.json"]),
     "another output of this command"),
    ("apply:gauge-out-is-gauge", _set(_noop, ["apply", "A", "out", "--gauge", "g.json",
                                              "--gauge-out", "g.json", "--overwrite"]),
     "is the input g.json"),
    ("apply:output-exists", lambda w: ((w / "out").mkdir(),
                                       ["apply", "A", "out", "--random", 1])[1],
     "already exists"),
    ("apply:output-parent-missing", _set(_noop, ["apply", "A", "no/such/out", "--random", 1]),
     "output directory no/such does not exist"),
    ("merge:export-aligned-is-A", _set(_noop, ["merge", "A", "B", "--gauge", "g.json", "-o",
                                               "M", "--export-aligned", "A", "--overwrite"]),
     "is the input A"),
    ("merge:output-is-base", _set(_noop, ["merge", "A", "B", "--gauge", "g.json", "-o", "A",
                                          "--method", "task-arithmetic", "--base", "A",
                                          "--overwrite"]), "is the input A"),
    ("merge:export-equals-output", _set(_noop, ["merge", "A", "B", "--gauge", "g.json", "-o",
                                                "M", "--export-aligned", "M"]),
     "another output of this command"),
    ("neurons:output-is-input", _set(_noop, ["transport", "neurons", "neurons.csv", "--gauge",
                                             "g.json", "-o", "neurons.csv", "--overwrite"]),
     "is the input neurons.csv"),
    ("steering:output-is-input", _set(_noop, ["transport", "steering", "steer.pt", "--gauge",
                                              "g.json", "-o", "steer.pt", "--overwrite"]),
     "is the input steer.pt"),
    ("sae:output-is-input", _set(_noop, ["transport", "sae", "sae", "--gauge", "g.json", "-o",
                                         "sae", "--overwrite"]), "is the input sae"),
    ("optim:output-is-model", _set(_noop, ["transport", "optim", "optimizer.pt", "--gauge",
                                           "g.json", "-o", "A/optimizer.pt", "--model", "A"]),
     "lies inside the input A"),
    ("compose:output-is-input", _set(_noop, ["compose", "g.json", "g2.json", "-o", "g.json",
                                             "--overwrite", "--force"]), "is the input g.json"),
    ("invert:output-is-input", _set(_noop, ["invert", "g.json", "-o", "g.json",
                                            "--overwrite"]), "is the input g.json"),
    ("audit:output-is-claim", _set(_noop, ["audit", "claim.json", "B", "-o", "claim.json",
                                           "--overwrite"]), "is the input claim.json"),
    ("audit:output-inside-source", _set(_noop, ["audit", "claim.json", "B", "-o",
                                                "A/report.json"]), "lies inside the input A"),
    ("stats:output-is-tokens", _set(_noop, ["stats", "A", "B", "-o", "ids.npy", "--tokens-from",
                                            "ids.npy", "--overwrite"]), "is the input ids.npy"),
    ("match:output-is-stats", _set(_noop, ["match", "A", "B", "-o", "stats.safetensors",
                                           "--stats", "stats.safetensors", "--overwrite"]),
     "is the input stats.safetensors"),
    ("trajectory:output-in-checkpoint", _set(_noop, ["trajectory", "A", "B", "-o",
                                                     "B/g.json"]), "lies inside the input B"),
]


def _record(w: Path, **meta_changes) -> None:
    """A fingerprint record of A in recs/, its metadata changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gaugefix.canonical import write_record

    (w / "recs").mkdir()
    tmp = w.parent / f"{w.name}-record.safetensors"
    write_record(w / "A", tmp, overwrite=True)
    with safe_open(str(tmp), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()["gaugefix"])
    tmp.unlink()
    meta.update(meta_changes)
    save_file(tensors, str(w / "recs" / "a.safetensors"), metadata={"gaugefix": json.dumps(meta)})


def _forge_stats(path: Path, key: str, value: str | None) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    if key == "tensor":
        del tensors["pooled.cross"]
    elif value is None:
        del header[key]
    else:
        header[key] = value
    save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize("name, setup, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, setup, message, world, cli):
    argv = setup(world)
    before = _snapshot(world)
    res = cli(*argv, ok=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message in lines[0], lines[0]
    assert "weights_only=False" not in lines[0] and "Traceback" not in res.output
    assert _snapshot(world) == before  # no output, no temporary, inputs byte-identical
    assert not (world / "PWNED").exists() and not any(world.rglob("PWNED"))


def test_every_command_is_swept():
    """The sweep covers every registered command (a new command needs its bad inputs)."""
    from gaugefix.cli import app

    commands = {c.callback.__name__ for c in app.registered_commands}
    swept = {name.split(":")[0].split("-")[0] for name, _, _ in CASES}
    swept |= {"transport"} if swept & {"neurons", "sae", "lora", "steering", "optim"} else set()
    assert commands <= swept, commands - swept


def test_failed_merge_leaves_no_exported_output(world, cli):
    """Shapes that differ are found before anything is written, and every difference is named."""
    from safetensors.torch import load_file, save_file

    sd = load_file(world / "B" / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    del sd["model.norm.weight"]
    save_file(sd, str(world / "B" / "model.safetensors"), metadata={"format": "pt"})
    before = _snapshot(world)
    res = cli("merge", "A", "B", "--gauge", "g.json", "-o", "M", "--export-aligned", "BA",
              ok=False)
    assert res.exit_code == 2
    assert "B lacks model.norm.weight" in res.stderr
    assert "model.layers.0.mlp.up_proj.weight [100, 64] vs [128, 64]" in res.stderr
    assert _snapshot(world) == before


def test_a_failure_after_the_first_output_rolls_both_back(world, cli, monkeypatch):
    """apply writes the model and the gauge file: if publishing the second fails, the first
    is removed again (and an overwritten output restored)."""
    import gaugefix.io as gio

    (world / "out").mkdir()
    (world / "out" / "mine.txt").write_text("keep me")
    real = gio._rename_noreplace

    def fail_on_gauge(src, dst):
        if dst.name == "gout.json":
            raise PermissionError(13, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(gio, "_rename_noreplace", fail_on_gauge)
    before = _snapshot(world)
    res = cli("apply", "A", "out", "--random", 1, "--gauge-out", "gout.json", "--overwrite",
              ok=False)
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "gout.json: Permission denied" in res.stderr
    assert _snapshot(world) == before  # the old output is back, nothing else is left


def test_unwritable_output_directory(world, cli, monkeypatch):
    """A read-only parent (checked up front; root bypasses permissions, so simulated)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).name == "ro" else
                        real(p, mode))
    (world / "ro").mkdir()
    before = _snapshot(world)
    res = cli("apply", "A", "ro/out", "--random", 1, ok=False)
    assert res.exit_code == 2 and "cannot write into ro (permission denied)" in res.stderr
    assert _snapshot(world) == before


def test_compose_force_warns_and_records_the_charts(world, cli):
    res = cli("compose", "g.json", "g2.json", "-o", "c.json", "--force")
    assert "warning:" in res.stderr and "do not chain" in res.stderr
    doc = json.loads((world / "c.json").read_text())
    assert doc["source"] == {"name": "A"} and doc["target"] == {"name": "D"}
    assert SignedPerm.load(world / "c.json") == SignedPerm.load(world / "g.json").then(
        SignedPerm.load(world / "g2.json"))


def test_valid_edge_values_are_accepted(world, cli):
    """The refusals above are rules, not a narrowing: the edges of each range still work."""
    cli("verify", "A", "B", "--gauge", "g.json", "--tol", 0.001, "--tokens", 1)
    cli("match", "A", "B", "-o", "m.json", "--layers=-1", "--tokens-from", "ids.npy",
        "--tokens", 512)
    cli("merge", "A", "B", "--gauge", "g.json", "-o", "M", "--weight", 1)
    cli("apply", "A", "out", "--random", 0, "--kind", "signed", "--positive-fraction", 0)
    (world / "n.json").write_text(json.dumps([{"index": "5", "score": -2, "gauge_sign": -1}]))
    cli("transport", "neurons", "n.json", "--gauge", "g.json", "-o", "n2.json")


# ---------------------------------------------------------------------------- links
# A checkpoint whose weight file is a symbolic link to a file elsewhere: the file behind the
# link is an input too, whichever library reads it (gaugefix's readers or transformers').
LINKED_WRITERS: dict[str, list] = {
    "stats": ["stats", "A", "B", "-o", "ext/real.safetensors", "--tokens-from", "ids.npy",
              "--tokens", 512, "--overwrite"],
    "stats-max-memory": ["stats", "A", "B", "-o", "ext/real.safetensors", "--tokens-from",
                         "ids.npy", "--tokens", 512, "--max-memory", "1GB", "--overwrite"],
    "match-activations": ["match", "A", "B", "--source", "activations", "-o",
                          "ext/real.safetensors", "--tokens-from", "ids.npy", "--tokens", 512,
                          "--overwrite"],
    "match-weights": ["match", "A", "B", "--source", "weights", "-o", "ext/real.safetensors",
                      "--overwrite"],
    "trajectory": ["trajectory", "A", "B", "--source", "activations", "-o",
                   "ext/real.safetensors", "--tokens-from", "ids.npy", "--tokens", 512,
                   "--overwrite"],
    "apply": ["apply", "A", "ext", "--random", 1, "--overwrite"],
    "canonicalize": ["canonicalize", "A", "ext", "--overwrite"],
    "audit": ["audit", "claim.json", "B", "--claim-source", "A", "-o", "ext/real.safetensors",
              "--gauges", 1, "--tokens-from", "ids.npy", "--tokens", 512, "--overwrite"],
}


@pytest.mark.parametrize("argv", LINKED_WRITERS.values(), ids=LINKED_WRITERS)
def test_a_file_behind_a_link_is_an_input(argv, world, cli):
    ext = world / "ext"
    ext.mkdir()
    (world / "A" / "model.safetensors").rename(ext / "real.safetensors")
    (world / "A" / "model.safetensors").symlink_to(ext / "real.safetensors")
    before = _snapshot(world)
    res = cli(*argv, ok=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert len(lines) == 1 and "inputs are never modified" in lines[0], res.stderr
    assert _snapshot(world) == before


# ---------------------------------------------------------------------------- second sweep
def _config(model: str, **changes):
    return lambda w: patch_json(w / model / "config.json", **changes)


def _untied_without_head(w: Path) -> None:
    from safetensors.torch import load_file, save_file

    patch_json(w / "A" / "config.json", tie_word_embeddings=False)
    sd = load_file(w / "A" / "model.safetensors")
    sd.pop("lm_head.weight", None)
    save_file(sd, w / "A" / "model.safetensors", metadata={"format": "pt"})


HOSTILE: list[Case] = [
    # counts above what exists or what memory holds
    ("match:tokens-1e9", _set(_noop, ["match", "A", "B", "-o", "out.json", "--tokens",
                                      10**9]), "above the maximum"),
    ("stats:tokens-2**63", _set(_noop, ["stats", "A", "B", "-o", "out.st", "--tokens",
                                        2**63]), "--tokens"),
    ("stats:batch-size-2**63", _set(_noop, ["stats", "A", "B", "-o", "out.st",
                                            "--batch-size", 2**63]), "--batch-size"),
    ("stats:seed-2**64", _set(_noop, ["stats", "A", "B", "-o", "out.st", "--seed", 2**64]),
     "--seed"),
    ("audit:tokens-1e9", _set(_noop, ["audit", "claim.json", "B", "--tokens", 10**9]),
     "above the maximum"),
    ("verify:tokens-1e8", _set(_noop, ["verify", "A", "B", "--gauge", "g.json", "--tokens",
                                       10**8]), "above the maximum"),
    *[(f"{cmd}:seq-len-above-positions", _set(_noop, argv), "longer than")
      for cmd, argv in (
          ("stats", ["stats", "G", "G", "-o", "out.st", "--seq-len", 4096, "--tokens-from",
                     "ids.npy", "--tokens", 512]),
          ("match", ["match", "G", "G", "-o", "out.json", "--seq-len", 4096, "--tokens-from",
                     "ids.npy", "--tokens", 512]),
          ("trajectory", ["trajectory", "G", "G", "-o", "out.json", "--seq-len", 4096,
                          "--tokens-from", "ids.npy", "--tokens", 512]))],
    ("audit:prompt-longer-than-positions", _set(
        lambda w: write(w / "claim.json", json.dumps(_claim(concept={
            "positive": [[5] * 200], "negative": [[6] * 200]}))),
        ["audit", "claim.json", "B", "--gauges", 1, "--tokens-from", "ids.npy", "--tokens",
         512]), "at most 128 positions"),
    ("match-weights:layers-99", _set(_noop, ["match", "A", "B", "-o", "out.json", "--source",
                                             "weights", "--layers", "99"]), "99"),
    # a config that contradicts its tensors, refused before any work by every command
    *[(f"{cmd}:config-width-32", _set(_config("A", hidden_size=32), argv(None)),
       "contradicts its tensors")
      for cmd, argv in CHECKPOINT_COMMANDS.items() if cmd not in ("inspect", "merge")],
    *[(f"{cmd}:config-3-layers", _set(_config("A", num_hidden_layers=3), argv(None)),
       "none for layer 2") for cmd, argv in CHECKPOINT_COMMANDS.items()
      if cmd in ("match", "match-weights", "verify", "audit", "canonicalize")],
    ("stats:config-million-layers", _set(
        _config("A", num_hidden_layers=10**6),
        ["stats", "A", "B", "-o", "out.st", "--max-memory", "1GB", "--tokens-from", "ids.npy",
         "--tokens", 512]), "none for layers 2–999999"),
    *[(f"canonicalize:config-hidden-{v}", _set(_config("A", hidden_size=v),
                                               ["canonicalize", "A", "out"]), msg)
      for v, msg in ((0, "is not a width"), (-64, "is not a width"),
                     (1e30, "no hidden size"))],
    ("verify:untied-without-head", _set(_untied_without_head,
                                        ["verify", "A", "B", "--gauge", "g.json"]),
     "lm_head.weight"),
    # one word, one meaning: audit's claim source is --claim-source
    ("audit:source-is-the-evidence-option", _set(_noop, ["audit", "claim.json", "B",
                                                         "--source", "weights"]),
     "No such option"),
    ("verify:dtype-unknown", _set(_noop, ["verify", "A", "B", "--gauge", "g.json", "--dtype",
                                          "float8"]), "unknown dtype 'float8'"),
]


@pytest.mark.parametrize("name, setup, message", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_command_line(name, setup, message, world, cli):
    test_bad_input(name, setup, message, world, cli)


# ---------------------------------------------------------------------------- hostile inputs
# Endless or blocking files (devices, FIFOs, through a link or not), files far beyond what a
# kind of input can be, integer tensors on a signed axis, outputs whose suffix names another
# format than the one written, and folders holding two layouts at once: each refused before
# anything is read whole or written.
DEVICES = ("/dev/zero", "/dev/urandom", "fifo")


def _hostile(w: Path, source: str, name: str) -> str:
    """``name`` in the world, made into ``source``: a link to a device, or a FIFO."""
    if source == "fifo":
        os.mkfifo(w / name)
    else:
        (w / name).symlink_to(source)
    return name


def _device_cases() -> list[Case]:
    readers: dict[str, tuple[str, Callable[[str], list], str]] = {
        "apply:gauge": ("x.json", lambda x: ["apply", "A", "out", "--gauge", x], "gauge file"),
        "compare:gauge": ("x.json", lambda x: ["compare", "g.json", x], "gauge file"),
        "invert:gauge": ("x.json", lambda x: ["invert", x, "-o", "i.json"], "gauge file"),
        "verify:gauge": ("x.json", lambda x: ["verify", "A", "B", "--gauge", x], "gauge file"),
        "neurons:json": ("x.json", lambda x: ["transport", "neurons", x, "--gauge", "g.json",
                                              "-o", "o.json"], "neuron list"),
        "neurons:csv": ("x.csv", lambda x: ["transport", "neurons", x, "--gauge", "g.json",
                                            "-o", "o.csv"], "neuron list"),
        "audit:claim": ("x.json", lambda x: ["audit", x, "B", "--gauges", 1], "claim file"),
        "match:tokens-text": ("x.txt", lambda x: ["match", "A", "B", "-o", "o.json",
                                                  "--tokens-from", x], "token source"),
        "stats:tokens-npy": ("x.npy", lambda x: ["stats", "A", "B", "-o", "o.safetensors",
                                                 "--tokens-from", x], "token source"),
        "steering:pt": ("x.pt", lambda x: ["transport", "steering", x, "--gauge", "g.json",
                                           "-o", "o.pt"], "steering vector file"),
    }
    cases = []
    for cmd, (fname, argv, what) in readers.items():
        for source in DEVICES:
            kind = "a FIFO" if source == "fifo" else "a character device"
            cases.append((f"{cmd}-{source.rsplit('/', 1)[-1]}",
                          lambda w, fname=fname, argv=argv, source=source:
                          argv(_hostile(w, source, fname)),
                          f"{fname}: not a regular file ({kind}); expected a {what}"))
    cases.append(("match:tokens-from-dev-zero", _set(_noop, ["match", "A", "B", "-o", "o.json",
                                                             "--tokens-from", "/dev/zero"]),
                  "/dev/zero: not a regular file (a character device); expected a token "
                  "source"))
    return cases


def sparse(path: Path, size: int) -> None:
    """A file of ``size`` bytes that takes no space (a hole): its size alone must refuse it."""
    with open(path, "wb") as f:
        f.truncate(size)


def with_dtype(model: Path, key: str, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(model / "model.safetensors")
    sd[key] = torch.ones_like(sd[key]).to(dtype)
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})


def with_tensor(path: Path, key: str, value: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    sd[key] = value
    save_file(sd, str(path), metadata={"format": "pt"})


def _cc_state() -> dict[str, torch.Tensor]:
    return {"W_enc": torch.randn(2, 64, 8), "W_dec": torch.randn(8, 2, 64),
            "b_enc": torch.zeros(8), "b_dec": torch.zeros(2, 64)}


def _save_cc(w: Path, name: str) -> None:
    from safetensors.torch import save_file

    if name.endswith(".pt"):
        torch.save(_cc_state(), w / name)
    else:
        save_file(_cc_state(), str(w / name))


HOSTILE_CASES: list[Case] = [
    *_device_cases(),
    # ------------------------------------------------------------------ size limits
    ("apply:gauge-huge", lambda w: (sparse(w / "big.json", 300 << 20),
                                    ["apply", "A", "out", "--gauge", "big.json"])[1],
     "big.json: 300.0 MiB, more than the 256.0 MiB a gauge file may have"),
    ("audit:claim-huge", lambda w: (sparse(w / "big.json", 65 << 20),
                                    ["audit", "big.json", "B", "--gauges", 1])[1],
     "big.json: 65.0 MiB, more than the 64.0 MiB a claim file may have"),
    ("neurons:csv-huge", lambda w: (sparse(w / "big.csv", 300 << 20),
                                    ["transport", "neurons", "big.csv", "--gauge", "g.json",
                                     "-o", "o.csv"])[1], "more than the 256.0 MiB a neuron list"),
    ("apply:config-huge", lambda w: (sparse(w / "A" / "config.json", 300 << 20),
                                     ["apply", "A", "out", "--random", 1])[1],
     "more than the 256.0 MiB a model config may have"),
    # ------------------------------------------------------------------ integer tensors
    *[(f"apply:{dt}-on-signed-axis", lambda w, dt=dt: (
        with_dtype(w / "A", "model.layers.0.mlp.down_proj.weight", getattr(torch, dt)),
        ["apply", "A", "out", "--random", 1])[1],
       f"integer tensor model.layers.0.mlp.down_proj.weight ({dt}) lies on a signed residual "
       "axis; negating it is not exact without its quantisation scheme")
      for dt in ("int8", "uint8", "int32", "bool")],
    ("apply:int8-embedding", lambda w: (
        with_dtype(w / "A", "model.embed_tokens.weight", torch.int8),
        ["apply", "A", "out", "--random", 1])[1], "integer tensor model.embed_tokens.weight"),
    # ------------------------------------------------------------------ fingerprint records
    ("identify:against-missing", _set(_noop, ["identify", "A", "--against", "nodir"]),
     "--against nodir: not a directory of fingerprint records"),
    ("identify:against-empty", lambda w: ((w / "recs").mkdir(),
                                          ["identify", "A", "--against", "recs"])[1],
     "no *.safetensors fingerprint records"),
    ("identify:against-not-records", lambda w: (
        (w / "recs").mkdir(), shutil.copy(w / "A" / "model.safetensors", w / "recs"),
        write(w / "recs" / "cut.safetensors", b"\x08\x00\x00"),
        ["identify", "A", "--against", "recs"])[3], "2 entries are not fingerprint records"),
    ("identify:against-forged-version", lambda w: (
        _record(w, version=99), ["identify", "A", "--against", "recs"])[1],
     "fingerprint record version 99"),
    ("identify:against-forged-rows", lambda w: (
        _record(w, hidden_size=7), ["identify", "A", "--against", "recs"])[1],
     "a malformed fingerprint record"),
    ("identify:against-and-b", _set(_noop, ["identify", "A", "B", "--against", "A"]),
     "either MODEL_B or --against"),
    ("identify:neither", _set(_noop, ["identify", "A"]), "either MODEL_B or --against"),
    ("fingerprint:record-exists", _set(_noop, ["fingerprint", "A", "--record", "g.json"]),
     "output g.json already exists"),
    ("fingerprint:record-inside-input", _set(_noop, ["fingerprint", "A", "--record",
                                                     "A/model.safetensors"]),
     "lies inside the input A"),
    ("canonicalize:int8", lambda w: (
        with_dtype(w / "A", "model.layers.0.self_attn.o_proj.weight", torch.int8),
        ["canonicalize", "A", "out"])[1], "(int8) lies on a signed residual axis"),
    ("sae:int8-encoder", lambda w: (
        with_tensor(w / "sae" / "sae_weights.safetensors", "W_enc",
                    torch.ones(64, 96, dtype=torch.int8)),
        ["transport", "sae", "sae", "--gauge", "g.json", "-o", "o"])[1],
     "sae (saelens) integer tensor W_enc (int8) lies on a signed residual axis"),
    ("steering:int-vector", lambda w: (torch.save(torch.ones(64, dtype=torch.int16),
                                                  w / "iv.pt"),
                                       ["transport", "steering", "iv.pt", "--gauge", "g.json",
                                        "-o", "o.pt"])[1], "(int16) lies on a signed residual"),
    # ------------------------------------------------------------------ suffixes
    ("crosscoder:pt-as-safetensors", lambda w: (_save_cc(w, "cc.pt"),
                                                ["transport", "crosscoder", "cc.pt", "--gauge",
                                                 "g.json", "-o", "y.safetensors"])[1],
     "output y.safetensors: its suffix '.safetensors' does not match the format written, a "
     "torch state dict"),
    ("crosscoder:safetensors-as-pt", lambda w: (_save_cc(w, "cc.safetensors"),
                                                ["transport", "crosscoder", "cc.safetensors",
                                                 "--gauge", "g.json", "-o", "y.pt"])[1],
     "output y.pt: its suffix '.pt' does not match the format written, a safetensors file"),
    ("optim:output-as-safetensors", _set(_noop, ["transport", "optim", "optimizer.pt",
                                                 "--gauge", "g.json", "-o", "o.safetensors",
                                                 "--model", "A"]),
     "its suffix '.safetensors' does not match the format written, a torch optimizer state"),
    ("neurons:json-as-csv", _set(_noop, ["transport", "neurons", "neurons.json", "--gauge",
                                         "g.json", "-o", "o.csv"]),
     "its suffix '.csv' does not match the format written, JSON (.json)"),
    ("neurons:csv-no-suffix", _set(_noop, ["transport", "neurons", "neurons.csv", "--gauge",
                                           "g.json", "-o", "o"]),
     "its suffix (none) does not match the format written, CSV (.csv)"),
    # ------------------------------------------------------------------ two layouts at once
    ("sae:two-layouts", lambda w: (shutil.copy(w / "sae" / "sae_weights.safetensors",
                                               w / "sae" / "sae.safetensors"),
                                   ["transport", "sae", "sae", "--gauge", "g.json", "-o",
                                    "o"])[1],
     "holds two layouts at once, SAELens (sae_weights.safetensors) and sparsify "
     "(sae.safetensors)"),
    ("lora:two-layouts", lambda w: (evil(w / "lora" / "adapter_model.bin"),
                                    ["transport", "lora", "lora", "--gauge", "g.json", "-o",
                                     "o", "--model", "A"])[1],
     "holds two layouts at once, safetensors weights (adapter_model.safetensors) and pickled "
     "weights (adapter_model.bin)"),
]


@pytest.mark.parametrize("name, setup, message", HOSTILE_CASES,
                         ids=[c[0] for c in HOSTILE_CASES])
def test_hostile_input(name, setup, message, world, cli):
    test_bad_input(name, setup, message, world, cli)


# ---------------------------------------------------------------------------- printed literally
MARKUP_NAMES = ["[bold]x[/bold]", "a[/]b", "[red", ":x: [link=https:x]y"]


@pytest.mark.parametrize("name", MARKUP_NAMES)
def test_text_from_paths_is_printed_literally(name, world, cli):
    """An output path (or any text from the user or a file) holding markup prints as it is,
    and the command succeeds."""
    for prefix in ("", "c"):  # a "/" in the name makes folders: they exist
        (world / f"{prefix}{name}").parent.mkdir(parents=True, exist_ok=True)
    res = cli("apply", "A", name, "--random", 1)
    assert name in res.stdout, res.stdout
    res = cli("canonicalize", "A", f"c{name}")
    assert f"c{name}" in res.stdout
    res = cli("match", "A", "B", "--source", "weights", "-o", f"{name}.json")
    assert f"{name}.json" in res.stdout
    res = cli("stats", "A", "B", "-o", f"{name}.st", "--tokens-from", "ids.npy", "--tokens",
              512)
    assert f"{name}.st" in res.stdout


def test_a_tensor_name_with_markup_is_reported_literally(world, cli):
    from safetensors.torch import load_file, save_file

    sd = load_file(world / "A" / "model.safetensors")
    sd["model.[bold]odd[/].weight"] = torch.zeros(3)
    save_file(sd, world / "A" / "model.safetensors", metadata={"format": "pt"})
    res = cli("apply", "A", "out", "--random", 1, ok=False)
    assert res.exit_code == 2 and "model.[bold]odd[/].weight" in res.stderr, res.stderr


# ---------------------------------------------------------------------------- JSON is JSON
def _strict_json(text: str):
    def refuse(c):
        raise ValueError(f"not JSON: {c}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_stays_json_when_weights_hold_nan(world, cli):
    from safetensors.torch import load_file, save_file

    sd = load_file(world / "B" / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, world / "B" / "model.safetensors", metadata={"format": "pt"})
    for argv in (["fingerprint", "B", "--json"], ["identify", "A", "B", "--json"],
                 ["verify", "A", "B", "--gauge", "g.json", "--json"]):
        res = cli(*argv, ok=False)
        assert res.exit_code in (0, 1), (argv, res.stderr)
        doc = _strict_json(res.stdout)
        if argv[0] == "verify":  # the verdict itself says why its errors are null
            assert res.exit_code == 1 and doc["passed"] is False and doc["max_rel_err"] is None
            assert doc["nonfinite"] and "in B" in doc["nonfinite"][0]
        elif "null" in res.stdout:
            assert "not finite" in res.stderr


def test_canonicalize_json_is_the_whole_stdout(world, cli):
    res = cli("canonicalize", "A", "out", "--json")
    assert _strict_json(res.stdout)["family"] == "llama"
    assert "written to out" in res.stderr


def test_verify_in_bfloat16_passes_an_exact_gauge_at_its_default_tolerance(world, cli):
    res = cli("verify", "A", "B", "--gauge", "g.json", "--dtype", "bfloat16")
    assert "PASS" in res.stdout and "the default for bfloat16" in res.stdout


def test_inspect_names_the_group_the_gains_leave(tmp_path, cli):
    from gaugefix.tiny import build_tiny

    build_tiny("llama", seed=0, generic=False).save_pretrained(tmp_path / "U")
    res = cli("inspect", tmp_path / "U")
    line = next(ln for ln in res.stdout.splitlines() if "gauge group" in ln)
    assert "O(64)" in line and "generic gains" not in line


def test_audit_checks_the_claim_on_its_own_source_first(world, cli):
    """A claim whose coordinates are not the top-k of its own prompts: the source's figure is
    reported and warned about, not silently averaged away."""
    res = cli("audit", "claim.json", "B", "--gauges", 1, "--tokens-from", "ids.npy",
              "--tokens", 512, "--json")
    doc = _strict_json(res.stdout)
    assert doc["source_reproduction"] is not None
    if doc["source_reproduction"] < 1:
        assert "on its source" in res.stderr


def test_a_permutation_moves_integer_tensors(world, cli):
    """Only the sign flip is inexact on integers: a gauge without one moves them exactly."""
    from safetensors.torch import load_file

    key = "model.layers.0.mlp.down_proj.weight"
    with_dtype(world / "A", key, torch.int8)
    SignedPerm.random(64, seed=3, kind="perm").save(world / "p.json")
    cli("apply", "A", "out", "--gauge", "p.json")
    a, b = load_file(world / "A" / "model.safetensors"), load_file(world / "out" /
                                                                    "model.safetensors")
    assert b[key].dtype == torch.int8
    assert torch.equal(b[key], SignedPerm.load(world / "p.json").apply(a[key], 0))


def test_the_other_weight_layout_is_left_out_not_copied_unmoved(world, cli):
    """A folder holding model.safetensors and pytorch_model.bin: the safetensors are moved and
    the .bin (another chart, once the first moved) is not copied into the output."""
    from safetensors.torch import load_file

    torch.save(load_file(world / "A" / "model.safetensors"), world / "A" / "pytorch_model.bin")
    res = cli("apply", "A", "out", "--random", 1)
    assert "pytorch_model.bin left out of the output" in res.stderr
    assert not (world / "out" / "pytorch_model.bin").exists()
    assert (world / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------------------- recorded or refused
@pytest.mark.parametrize("argv", [
    ["transport", "steering", "steer.pt", "--gauge", "g.json", "-o", "out.pt",
     "--checkpoint", "B"],
    ["transport", "neurons", "neurons.json", "--gauge", "g.json", "-o", "out.json",
     "--checkpoint", "B"],
    ["transport", "sae", "sae", "--gauge", "g.json", "-o", "out", "--checkpoint", "N"],
], ids=["steering-pt", "neurons", "sae-of-another-width"])
def test_a_checkpoint_that_cannot_be_recorded_is_refused(argv, world, cli):
    from gaugefix.tiny import build_tiny

    build_tiny("llama", seed=0, hidden_size=32, intermediate_size=64, num_attention_heads=2,
               num_key_value_heads=1).save_pretrained(world / "N")
    before = _snapshot(world)
    res = cli(*argv, ok=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "--checkpoint" in lines[0]
    assert _snapshot(world) == before


def test_an_all_zero_checkpoint_is_named_as_such(world, cli):
    from safetensors.torch import load_file, save_file

    for m in ("A", "B"):
        sd = {k: torch.zeros_like(v) for k, v in
              load_file(world / m / "model.safetensors").items()}
        save_file(sd, world / m / "model.safetensors", metadata={"format": "pt"})
    res = cli("match", "A", "B", "--source", "weights", "-o", "out.json", ok=False)
    assert res.exit_code == 2 and "is zero" in res.stderr, res.stderr
