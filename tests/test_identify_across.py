"""Identity across widths, vocabularies and depths (gaugefix.sketch): derivatives made here by
construction — residual coordinates removed, layers dropped or repeated, vocabularies cut,
extended and reordered (keyed by token string through tokenizer.json) — are derived with the
map that made them; independently initialised models of other shapes are unrelated; and a
suspect is tested against a folder of fingerprint records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gaugefix import jobs
from gaugefix.group import SignedPerm
from gaugefix.model import open_model
from gaugefix.relation import DEFAULT_ALPHA
from gaugefix.tiny import build_tiny

D, LAYERS, VOCAB = 64, 8, 1024
LAYER = re.compile(r"(?<=\.layers\.)\d+(?=\.)|(?<=\.h\.)\d+(?=\.)")


def _tiny(family: str = "llama", seed: int = 0, **kw):
    kw.setdefault("vocab_size", VOCAB)
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    kw.setdefault(key, LAYERS)
    return build_tiny(family, seed=seed, **kw)


def _tokenizer(path: Path, words: list[str]) -> None:
    """A word-level tokenizer.json naming ids 0..len(words)-1 (read by gaugefix.tokens)."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])
              ).save(str(path / "tokenizer.json"))


WORDS = ["<unk>", *(f"w{i:04d}" for i in range(1, VOCAB))]


def _save(module, path: Path, state: dict[str, torch.Tensor] | None = None,
          words: list[str] | None = None) -> Path:
    if state is not None:
        module.load_state_dict(state)
    module.save_pretrained(path)
    if words is not None:
        _tokenizer(path, words)
    return path


def _prune(module, keep: list[int]) -> dict[str, torch.Tensor]:
    """Every tensor restricted to the residual coordinates ``keep`` along its residual axes."""
    plan = open_model(module).plan
    idx = torch.tensor(keep)
    out = {}
    for k, v in module.state_dict().items():
        for axis in plan[k].axes:
            v = v.index_select(axis, idx)
        out[k] = v
    return out


def _layers(state: dict[str, torch.Tensor], order: list[int]) -> dict[str, torch.Tensor]:
    """Layer j of the result is layer order[j] of ``state``."""
    out = {}
    for k, v in state.items():
        m = LAYER.search(k)
        if m is None:
            out[k] = v
            continue
        for j, i in enumerate(order):
            if int(m.group()) == i:
                out[k[:m.start()] + str(j) + k[m.end():]] = v.clone()
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("across")
    return _save(_tiny(), root / "A", words=WORDS), root


def test_removed_coordinates_are_found_with_their_map(base):
    a, root = base
    keep = sorted(np.random.default_rng(0).choice(D, 48, replace=False).tolist())
    src = _tiny()
    src.load_state_dict(open_model(a).load("float32").state_dict())
    b = _save(_tiny(hidden_size=48, head_dim=16), root / "pruned", _prune(src, keep), WORDS)
    r = jobs.identify(a, b)
    assert r.verdict == "derived", r.reason
    assert "48 of 64 coordinates" in r.reason and "different widths" not in r.reason
    cmap = r.evidence["coordinate_map"]
    assert cmap["a"] == [keep[i] for i in cmap["b"]]  # B's coordinate i is A's keep[i]
    assert set(cmap["sign"]) == {1}
    assert r.evidence["p_value"] <= DEFAULT_ALPHA and r.gauge is None


def test_dropped_and_repeated_layers_are_mapped(base):
    a, root = base
    state = open_model(a).load("float32").state_dict()
    dropped = _save(_tiny(num_hidden_layers=6), root / "dropped",
                    _layers(state, [0, 1, 2, 5, 6, 7]), WORDS)
    r = jobs.identify(a, dropped)
    assert r.verdict == "derived", r.reason
    assert "A 0–2 → B 0–2, A 5–7 → B 3–5 (A 3–4 dropped)" in r.reason
    assert r.gauge == SignedPerm.identity(D)  # equal widths: the gauge witness
    up = _save(_tiny(num_hidden_layers=12), root / "upscaled",
               _layers(state, [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]), WORDS)
    r = jobs.identify(a, up)
    assert r.verdict == "derived", r.reason
    assert "A 0–5 → B 0–5, A 2–7 → B 6–11 (A 2–5 repeated)" in r.reason
    layer_map = r.evidence["layer_map"]
    assert [layer_map[str(j)]["a"][0] for j in range(12)] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]


def test_vocabularies_meet_on_token_strings(base):
    """B's vocabulary is A's reordered, cut to 900 tokens and extended by 100 new ones, its
    coordinates re-gauged: the rows meet on their strings, not their ids."""
    a, root = base
    module = open_model(a).load("float32")
    g = SignedPerm.random(D, 5)
    plan = open_model(module).plan
    state = {k: plan[k](g, v) for k, v in module.state_dict().items()}
    rng = np.random.default_rng(1)
    kept = rng.permutation(VOCAB)[:900]
    words = [WORDS[i] for i in kept] + [f"new{i}" for i in range(100)]
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in state:
            w = state[k]
            state[k] = torch.cat([w[torch.from_numpy(kept)], torch.randn(100, D) * w.std()])
    b = _save(_tiny(vocab_size=1000), root / "vocab", state, words)
    r = jobs.identify(a, b)
    assert r.verdict == "derived", r.reason
    assert "900 shared tokens" in r.reason
    assert r.gauge == g


def test_ids_key_the_rows_when_there_is_no_tokenizer(tmp_path):
    a = _save(_tiny(), tmp_path / "A")
    state = open_model(a).load("float32").state_dict()
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in state:
            state[k] = state[k][:700]
    b = _save(_tiny(vocab_size=700), tmp_path / "B", state)
    r = jobs.identify(a, b)
    assert r.verdict == "derived" and "700 shared tokens" in r.reason, r.reason


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_independent_models_of_other_shapes_are_unrelated(tmp_path, family):
    """Independent initialisations, narrower and shallower: never derived at the default α
    (B_d families: Hoeffding's bound; LayerNorm families: the normal tail), and their
    p-values are not small."""
    if family == "gpt2":
        a = _save(_tiny(family), tmp_path / "A")
        others = [_tiny(family, seed=s, n_embd=48) for s in (1, 2)] + [
            _tiny(family, seed=3, n_layer=6)]
    else:
        a = _save(_tiny(family), tmp_path / "A", words=WORDS)
        others = [_tiny(family, seed=s, hidden_size=48, head_dim=16) for s in (1, 2)] + [
            _tiny(family, seed=3, num_hidden_layers=6)]
    logs = []
    for n, m in enumerate(others):
        b = _save(m, tmp_path / f"B{n}", words=None if family == "gpt2" else WORDS)
        r = jobs.identify(a, b)
        assert r.verdict == "unrelated", r.reason
        logs.append(r.evidence["log10_p_value"])
    assert min(logs) > -3, logs


def test_layernorm_family_derivative_across_depths(tmp_path):
    """GPT-2 (S_d×{±1}: one global sign, the normal tail): layers dropped, re-gauged."""
    a = _save(_tiny("gpt2"), tmp_path / "A")
    module = open_model(a).load("float32")
    g = SignedPerm.random(D, 2, kind="perm")
    plan = open_model(module).plan
    state = _layers({k: plan[k](g, v) for k, v in module.state_dict().items()},
                    [0, 1, 4, 5, 6, 7])
    b = _save(_tiny("gpt2", n_layer=6), tmp_path / "B", state)
    r = jobs.identify(a, b)
    assert r.verdict == "derived", r.reason
    assert "A 2–3 dropped" in r.reason and r.gauge == g


def test_against_a_folder_of_records(base, tmp_path, cli):
    """`fingerprint --record` writes a small record; `identify SUSPECT --against DIR` tests
    the suspect against each: same (with the gauge), derived, unrelated."""
    a, _ = base
    records = tmp_path / "records"
    records.mkdir()
    g = SignedPerm.random(D, 9)
    regauged = tmp_path / "regauged"
    jobs.apply(a, regauged, g)
    _tokenizer(regauged, WORDS)
    state = open_model(a).load("float32").state_dict()
    shallow = _save(_tiny(num_hidden_layers=6), tmp_path / "shallow",
                    _layers(state, [0, 1, 2, 3, 4, 5]), WORDS)
    other = _save(_tiny(seed=7), tmp_path / "other", words=WORDS)
    for name, path in (("base", a), ("shallow", shallow), ("other", other)):
        cli("fingerprint", path, "--record", records / f"{name}.safetensors")
    size = (records / "base.safetensors").stat().st_size
    weights = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    assert size < weights  # a sketch, not the weights (rows sampled at real sizes)
    res = json.loads(cli("identify", regauged, "--against", records, "--json").stdout)
    got = {Path(r["record"]).stem: r for r in res["results"]}
    assert got["base"]["verdict"] == "same"
    assert SignedPerm.from_json(got["base"]["gauge"]) == g
    assert got["shallow"]["verdict"] == "derived", got["shallow"]["reason"]
    assert got["other"]["verdict"] == "unrelated", got["other"]["reason"]
    assert [r["verdict"] for r in res["results"]] == ["same", "derived", "unrelated"]
    text = cli("identify", regauged, "--against", records).stdout
    assert text.splitlines()[0].startswith("same")


def test_against_refuses_what_is_not_a_record(base, tmp_path, cli):
    a, _ = base
    folder = tmp_path / "mixed"
    folder.mkdir()
    cli("fingerprint", a, "--record", folder / "a.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(folder / "weights.safetensors"))
    (folder / "junk.safetensors").write_bytes(b"not a file")
    res = cli("identify", a, "--against", folder, ok=False)
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert line.count("\n") == 0 and "2 entries are not fingerprint records" in line
    assert "weights.safetensors" in line and "junk.safetensors" in line
    # what the third sweep found skipped silently: every entry must be a regular record
    import os

    (folder / "weights.safetensors").unlink()
    (folder / "junk.safetensors").unlink()
    (folder / "README.txt").write_text("records of the zoo")
    (folder / "gone.safetensors").symlink_to(folder / "nowhere.safetensors")
    (folder / "loop.safetensors").symlink_to(folder / "loop.safetensors")
    (folder / "zero.safetensors").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.safetensors")
    (folder / "sub").mkdir()
    res = cli("identify", a, "--against", folder, ok=False)
    line = res.stderr.strip()
    assert res.exit_code == 2 and line.count("\n") == 0, res.stderr
    assert "6 entries are not fingerprint records" in line
    for name in ("README.txt", "gone.safetensors", "loop.safetensors", "zero.safetensors",
                 "pipe.safetensors", "sub"):
        assert name in line, name
    assert "a FIFO" in line and "a character device" in line
    for name in ("README.txt", "gone.safetensors", "loop.safetensors", "zero.safetensors",
                 "pipe.safetensors"):
        (folder / name).unlink()
    (folder / "sub").rmdir()
    res = cli("identify", a, "--against", folder, "--json")
    assert res.exit_code == 0
    res = cli("identify", a, a, "--against", folder, ok=False)
    assert res.exit_code == 2 and "either MODEL_B or --against" in res.stderr
    res = cli("fingerprint", a, "--record", folder / "a.safetensors", ok=False)
    assert res.exit_code == 2  # an existing record is not replaced without --overwrite


def test_a_position_table_as_long_as_the_vocabulary_is_not_taken_for_tokens():
    """GPT-2 with 128 tokens and 128 positions: the sketch's token rows are the token
    embedding's (wte), never the position table's (wpe), which has the same shape."""
    from gaugefix.sketch import Sketch

    module = build_tiny("gpt2", seed=0)
    assert module.config.vocab_size == module.config.n_positions
    sk = Sketch.of(open_model(module).check())
    ids = [int(k[1:]) for k in sk.keys]  # keyed by id: no tokenizer
    wte = module.transformer.wte.weight.detach()
    assert np.array_equal(sk.tokens["embed"], wte[ids].numpy())


def test_against_reads_one_record_at_a_time(base, tmp_path, monkeypatch):
    """Memory does not grow with the folder: when each record is read, no record read before
    it is still alive (the folder's entries are checked from their headers first)."""
    import gc
    import shutil
    import weakref

    from gaugefix import jobs
    from gaugefix.sketch import Sketch

    a, _ = base
    folder = tmp_path / "many"
    folder.mkdir()
    jobs.fingerprint(a, record=folder / "r0.safetensors")
    for i in range(1, 6):
        shutil.copy(folder / "r0.safetensors", folder / f"r{i}.safetensors")
    alive: list[weakref.ref] = []
    most = []
    load = Sketch.load.__func__

    def counted(cls, path):
        gc.collect()
        most.append(sum(r() is not None for r in alive))
        out = load(cls, path)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(Sketch, "load", classmethod(counted))
    found = jobs.identify_against(a, folder)
    assert len(found) == 6 and all(r.identity.verdict == "same" for r in found)
    assert len(most) == 6 and max(most) == 0, most
