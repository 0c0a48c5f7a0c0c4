"""Gauge-sweep audits of index-level claims."""

from __future__ import annotations

import json

import numpy as np

from gaugefix.apply import gauge_model
from gaugefix.audit import Claim, carry, derive_claim, load_claim, reproduction
from gaugefix.demo.steer import sentiment_prompts
from gaugefix.group import SignedPerm


def _claim(lineage, model):
    """The top-8 sentiment coordinates where the fixture established that the model carries
    sentiment to the last token (after decoder layer ``sentiment[0]``): elsewhere the contrast
    can be rounding noise, whose top-8 no re-derivation reproduces."""
    pos = sentiment_prompts(lineage.corpus, True, seed=2).tolist()
    neg = sentiment_prompts(lineage.corpus, False, seed=3).tolist()
    return derive_claim(model, layer=lineage.sentiment[0] + 1, positive=pos, negative=neg, k=8)


def test_carry_matches_the_index_map():
    g = SignedPerm.random(16, seed=0)
    coords = [(3, 1), (7, -1)]
    (i3, i7), (s3, s7) = g.index_map([3, 7])
    assert carry(coords, g) == [(i3, s3), (i7, -s7)]
    assert reproduction(coords, carry(coords, SignedPerm.identity(16))) == 1.0


def test_audit_cli_raw_index_fails_explicit_gauge_holds(trained_llama, tmp_path, cli):
    a = trained_llama.base
    claim = _claim(trained_llama, a)
    claim.source = str(tmp_path / "A")
    (tmp_path / "claim.json").write_text(json.dumps(claim.to_json()))
    assert load_claim(tmp_path / "claim.json").coordinates == claim.coordinates
    a.save_pretrained(tmp_path / "A")
    g = SignedPerm.random(64, seed=3)
    gauge_model(a, g).save_pretrained(tmp_path / "B")
    np.save(tmp_path / "ids.npy", trained_llama.probe(8192))

    res = cli("audit", tmp_path / "claim.json", tmp_path / "A", tmp_path / "B", "--gauges", 2,
              "--tokens-from", tmp_path / "ids.npy", "--tokens", 8192, "--json",
              "--fingerprints")
    rep = json.loads(res.stdout)
    # A and its re-gauged copy B are one model: one fingerprint names both
    fps = rep["fingerprints"]
    assert set(fps) == {str(tmp_path / "A"), str(tmp_path / "B")}
    assert fps[str(tmp_path / "A")] == fps[str(tmp_path / "B")]
    rows = {(r["model"].split("/")[-1], r["gauge"]): r for r in rep["rows"]}
    assert rows[("A", "estimated")]["raw"] == 1.0
    assert rows[("A", "estimated")]["transported"] == 1.0
    assert rows[("B", "estimated")]["transported"] == 1.0
    assert rows[("B", "estimated")]["raw"] <= 0.5  # same function, another chart
    randoms = [r for r in rep["rows"] if r["gauge"].startswith("random")]
    assert len(randoms) == 2 * 2 * 2  # 2 models × 2 gauges × (B_d, S_d)
    assert all(r["transported"] == 1.0 for r in randoms)
    assert np.mean([r["raw"] for r in randoms]) < 0.5
    assert rep["summary"]["random B_d"]["transported"] == 1.0

    res = cli("audit", tmp_path / "claim.json", tmp_path / "B", "--gauges", 1, "--tokens-from",
              tmp_path / "ids.npy", "--tokens", 8192)
    assert "through the explicit gauge" in res.stdout


def test_direction_claims_and_bad_claim_files(trained_llama, tmp_path, cli):
    from gaugefix.audit import audit_models

    a = trained_llama.base
    direction = np.random.default_rng(0).normal(size=64)
    from gaugefix.audit import top_coordinates

    claim = Claim(1, top_coordinates(direction, 5), direction=direction)
    g = SignedPerm.random(64, seed=1)
    rep = audit_models(claim, [("B", gauge_model(a, g), g)], n_gauges=1)
    assert all(r.transported == 1.0 for r in rep.rows)

    (tmp_path / "bad.json").write_text(json.dumps({"format": "gaugefix.claim/1", "layer": 1,
                                                   "concept": {}, "coordinates": [{"index": 1}]}))
    res = cli("audit", tmp_path / "bad.json", tmp_path, ok=False)
    assert res.exit_code == 2 and "positive" in res.stderr
    (tmp_path / "other.json").write_text("{}")
    res = cli("audit", tmp_path / "other.json", tmp_path, ok=False)
    assert res.exit_code == 2 and "not a claim file" in res.stderr
