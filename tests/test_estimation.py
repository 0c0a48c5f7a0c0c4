"""Gauge estimation: planted gauges, the signed-matching ceiling, drift, statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gaugefix.apply import gauge_model
from gaugefix.errors import GaugefixError
from gaugefix.estimate import StatsOptions, estimate_gauge, match_weights, trajectory
from gaugefix.group import SignedPerm
from gaugefix.match import LOW_MARGIN_SD
from gaugefix.stats import Moments, collect_stats
from gaugefix.verify import compare_models, probe_tokens

from .conftest import self_confidence


def _opts(lineage, n=4096):
    return StatsOptions(tokens=lineage.probe(n), n_tokens=n)


def test_signmarg_recovers_an_exact_planted_gauge_rmsnorm(trained_llama):
    """B = Q·A: every block of evidence is A's own, moved by Q, so the gauge is exact and each
    coordinate's confidence is the one A's coordinate has when A is matched with itself (low
    exactly where A itself is nearly degenerate, which depends on the run)."""
    g = SignedPerm.random(64, seed=1)
    b = gauge_model(trained_llama.base, g)
    r = estimate_gauge(trained_llama.base, b, opts=_opts(trained_llama))
    assert r.gauge == g
    own = self_confidence(trained_llama.base, trained_llama.probe(4096))
    assert np.allclose(r.confidence, own[g.perm], atol=1e-5)  # B's i is A's perm[i]


def test_signmarg_recovers_perm_and_global_sign_layernorm(trained_gpt2):
    for seed in (1, 2):
        g = SignedPerm.random(64, seed=seed, kind="global")
        b = gauge_model(trained_gpt2.base, g)
        r = estimate_gauge(trained_gpt2.base, b, opts=_opts(trained_gpt2))
        assert r.gauge == g
        assert r.gauge.global_sign == g.global_sign


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_signed_matching_is_capped_by_the_positive_sign_fraction(trained_llama, p):
    g = SignedPerm.random(64, seed=3, positive_fraction=p)
    b = gauge_model(trained_llama.base, g)
    opts = _opts(trained_llama)
    signed = estimate_gauge(trained_llama.base, b, method="signed", opts=opts)
    signmarg = estimate_gauge(trained_llama.base, b, method="signmarg", opts=opts)
    assert signed.gauge.compare(g)["perm_accuracy"] <= p + 0.05
    assert signmarg.gauge.compare(g)["full_accuracy"] == 1.0


def test_permutation_only_gets_negative_signs_wrong_and_breaks_transport(trained_llama):
    g = SignedPerm.random(64, seed=4, positive_fraction=0.5)
    model_a = trained_llama.base
    model_b = gauge_model(model_a, g)
    opts = _opts(trained_llama)
    perm = estimate_gauge(model_a, model_b, method="perm", opts=opts).gauge
    signmarg = estimate_gauge(model_a, model_b, opts=opts).gauge
    assert np.array_equal(perm.perm, g.perm)
    wrong = np.flatnonzero(perm.sign != g.sign)
    assert np.array_equal(wrong, np.flatnonzero(g.sign < 0))  # exactly the negative ones
    ids = probe_tokens(model_a.config.vocab_size, 256, 64)
    assert compare_models(model_a, model_b, signmarg, ids, tol=1e-5).passed
    bad = compare_models(model_a, model_b, perm, ids, tol=1e-5)
    assert not bad.passed and max(bad.hidden_rel_err) > 0.5


def test_weight_matching_recovers_exact_planted_gauges(trained_llama, trained_gpt2):
    g = SignedPerm.random(64, seed=5)
    assert match_weights(trained_llama.base, gauge_model(trained_llama.base, g)).gauge == g
    gl = SignedPerm.random(64, seed=6, kind="global")
    assert match_weights(trained_gpt2.base, gauge_model(trained_gpt2.base, gl)).gauge == gl


def test_trajectory_composition_beats_endpoint_matching_under_drift(drift_lineage):
    lin = drift_lineage
    run_a, run_b = lin.runs["A"], lin.runs["B"]
    n = len(run_a)
    gauges_a = [SignedPerm.random(64, seed=1000 + i) for i in range(n)]
    gauges_b = [SignedPerm.random(64, seed=2000 + i) for i in range(n)]
    g_base = SignedPerm.random(64, seed=999)
    a = [gauge_model(m, g) for m, g in zip(run_a, gauges_a, strict=True)]
    b = [gauge_model(m, g) for m, g in zip(run_b, gauges_b, strict=True)]
    base = gauge_model(lin.base, g_base)
    truth = gauges_a[-1].inverse().then(gauges_b[-1])  # A_n's chart -> B_n's chart
    opts = _opts(lin)

    endpoint = estimate_gauge(a[-1], b[-1], opts=opts).gauge.compare(truth)
    composed = trajectory([*a[::-1], base, *b], opts=opts)
    acc = composed.gauge.compare(truth)
    # the fixture established drift (native endpoints match below 0.99) and small local steps
    # (each consecutive native pair matches exactly): composition must then be exact in any
    # charts, because the estimator is equivariant, while the endpoint keeps its errors
    assert endpoint["full_accuracy"] == pytest.approx(lin.endpoint_accuracy)
    assert acc["full_accuracy"] == 1.0
    assert len(composed.steps) == 2 * n


def test_chunked_statistics_equal_the_one_shot_computation(trained_llama):
    model = trained_llama.base
    b = gauge_model(model, SignedPerm.random(64, seed=7))
    ids = trained_llama.probe(2048)
    one = collect_stats(model, b, ids, batch_size=16, seq_len=128, compute_dtype=torch.float64)
    many = collect_stats(model, b, ids, batch_size=1, seq_len=128, compute_dtype=torch.float64)
    f32 = collect_stats(model, b, ids, batch_size=3, seq_len=128)
    for name in ("mean_a", "m2_a", "m2_b", "cross"):
        x, y = getattr(one.pooled, name), getattr(many.pooled, name)
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-10 * float(x.abs().max())), name
        z = getattr(f32.pooled, name)
        assert torch.allclose(x, z, rtol=1e-4, atol=1e-5 * float(x.abs().max())), name

    # a direct float64 computation over all (token, position) samples
    from gaugefix.stats import ResidualTap, residuals

    batch = torch.from_numpy(ids).reshape(16, 128)
    with ResidualTap(model, _fam(model), None) as tap_a, ResidualTap(b, _fam(b), None) as tap_b:
        ra, rb = residuals(model, batch, tap_a), residuals(b, batch, tap_b)
    xa = torch.cat([ra[p] for p in sorted(ra)]).double()
    xb = torch.cat([rb[p] for p in sorted(rb)]).double()
    direct = Moments.of_chunk(xa, xb, torch.float64)
    assert torch.allclose(direct.cross, one.pooled.cross, rtol=1e-9,
                          atol=1e-9 * float(direct.cross.abs().max()))
    assert one.n_tokens == 2048 and one.pooled.n == 2048 * 3


def _fam(model):
    from gaugefix.arch import detect_family

    return detect_family(model.config)


def test_statistics_of_two_shards_add_up_to_the_whole(trained_llama, tmp_path):
    model = trained_llama.base
    b = gauge_model(model, SignedPerm.random(64, seed=8))
    ids = trained_llama.probe(2048)
    whole = collect_stats(model, b, ids, compute_dtype=torch.float64, per_position=True)
    s1 = collect_stats(model, b, ids[:1024], compute_dtype=torch.float64, per_position=True)
    s2 = collect_stats(model, b, ids[1024:], compute_dtype=torch.float64, per_position=True)
    s1.save(tmp_path / "s1.safetensors")
    s2.save(tmp_path / "s2.safetensors")
    from gaugefix.stats import CrossStats

    total = CrossStats.load(tmp_path / "s1.safetensors") + CrossStats.load(
        tmp_path / "s2.safetensors")
    assert total.n_tokens == whole.n_tokens
    for p in whole.per_position:
        assert torch.allclose(total.per_position[p].cross, whole.per_position[p].cross,
                              rtol=1e-10, atol=1e-9)
    assert torch.allclose(total.pooled.correlation(), whole.pooled.correlation(), atol=1e-12)


def test_statistics_with_nan_are_refused(trained_llama):
    from gaugefix.arch import get_family
    from gaugefix.estimate import match_stats

    model = trained_llama.base
    st = collect_stats(model, model, trained_llama.probe(512))
    st.pooled.cross[3, 4] = float("nan")
    with pytest.raises(GaugefixError, match="NaN/Inf"):
        match_stats(st, get_family("llama"))


# ---------------------------------------------------------------------------- CLI
@pytest.fixture
def saved_pair(tmp_path, trained_llama):
    a = tmp_path / "A"
    trained_llama.base.save_pretrained(a)
    np.save(tmp_path / "ids.npy", trained_llama.probe(4096))
    return a


def test_match_cli_writes_a_gauge_with_confidence(saved_pair, tmp_path, cli):
    a = saved_pair
    cli("apply", a, tmp_path / "B", "--random", 9, "--gauge-out", tmp_path / "true.json")
    cli("match", a, tmp_path / "B", "-o", tmp_path / "est.json", "--tokens-from",
        tmp_path / "ids.npy", "--tokens", 4096, "--per-layer")
    doc = json.loads((tmp_path / "est.json").read_text())
    assert len(doc["confidence"]) == 64 and doc["method"] == "signmarg"
    assert doc["evidence"] == "both" and doc["n_tokens"] == 4096
    assert set(doc["per_position_agreement"]) == {"0", "1", "2"}
    assert set(doc["evidence_weights"]) == {"position 0", "position 1", "position 2", "weights"}
    assert all(w > 0 for w in doc["evidence_weights"].values())  # an exact copy: all single out
    res = cli("compare", tmp_path / "est.json", tmp_path / "true.json", "--json")
    assert json.loads(res.stdout)["full_accuracy"] == 1.0

    cli("match", a, tmp_path / "B", "-o", tmp_path / "w.json", "--source", "weights")
    assert SignedPerm.load(tmp_path / "w.json") == SignedPerm.load(tmp_path / "true.json")

    # statistics computed on separate shards, then matched together
    for k, seed in enumerate((1, 2)):
        cli("stats", a, tmp_path / "B", "-o", tmp_path / f"s{k}.safetensors", "--tokens", 1024,
            "--seed", seed)
    cli("match", a, tmp_path / "B", "-o", tmp_path / "s.json", "--stats",
        tmp_path / "s0.safetensors", "--stats", tmp_path / "s1.safetensors")
    assert SignedPerm.load(tmp_path / "s.json") == SignedPerm.load(tmp_path / "true.json")


def test_text_and_torch_token_sources(saved_pair, tmp_path, cli, trained_llama):
    a = saved_pair
    trained_llama.corpus.tokenizer().save_pretrained(a)
    cli("apply", a, tmp_path / "B", "--random", 4, "--gauge-out", tmp_path / "true.json")
    docs = tmp_path / "docs"
    docs.mkdir()
    text = trained_llama.corpus.decode(trained_llama.probe(6000)).replace("<eos> ", "<eos>\n")
    (docs / "part1.txt").write_text(text[: len(text) // 2])
    (docs / "part2.md").write_text(text[len(text) // 2 :])
    cli("match", a, tmp_path / "B", "-o", tmp_path / "t.json", "--tokens-from", docs,
        "--tokens", 4096)
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["n_tokens"] == 4096
    assert SignedPerm.load(tmp_path / "t.json") == SignedPerm.load(tmp_path / "true.json")
    torch.save(torch.from_numpy(trained_llama.probe(4096)).view(32, 128), tmp_path / "ids.pt")
    cli("match", a, tmp_path / "B", "-o", tmp_path / "p.json", "--tokens-from",
        tmp_path / "ids.pt")
    assert SignedPerm.load(tmp_path / "p.json") == SignedPerm.load(tmp_path / "true.json")


def test_trajectory_compose_invert_cli(saved_pair, trained_llama, tmp_path, cli):
    a = saved_pair
    cli("apply", a, tmp_path / "B", "--random", 1, "--gauge-out", tmp_path / "g1.json")
    cli("apply", tmp_path / "B", tmp_path / "C", "--random", 2, "--gauge-out",
        tmp_path / "g2.json")
    res = cli("trajectory", a, tmp_path / "B", tmp_path / "C", "-o", tmp_path / "t.json",
              "--tokens-from", tmp_path / "ids.npy", "--json", "--no-bridge")
    steps = json.loads(res.stdout)
    own = self_confidence(trained_llama.base, trained_llama.probe(4096))
    degenerate = int((own < LOW_MARGIN_SD).sum())
    assert len(steps) == 2 and all(s["n_low_confidence"] == degenerate for s in steps)
    cli("compose", tmp_path / "g1.json", tmp_path / "g2.json", "-o", tmp_path / "c.json")
    assert SignedPerm.load(tmp_path / "t.json") == SignedPerm.load(tmp_path / "c.json")
    cli("invert", tmp_path / "c.json", "-o", tmp_path / "ci.json")
    assert SignedPerm.load(tmp_path / "ci.json") == SignedPerm.load(tmp_path / "c.json").inverse()
    res = cli("compare", tmp_path / "ci.json", tmp_path / "c.json")
    assert "full accuracy" in res.stdout


def test_strict_exits_1_when_a_coordinate_is_below_the_threshold(saved_pair, tmp_path, cli):
    """--strict: flagged coordinates are the verdict (one line, exit 1); the gauge file is
    written either way. Thresholds are placed by construction around the confidences the
    file itself reports."""
    a = saved_pair
    cli("apply", a, tmp_path / "B", "--random", 5, "--gauge-out", tmp_path / "true.json")
    common = ["--tokens-from", tmp_path / "ids.npy", "--tokens", 4096]
    cli("match", a, tmp_path / "B", "-o", tmp_path / "g.json", *common)
    conf = np.sort(json.loads((tmp_path / "g.json").read_text())["confidence"])
    low, mid = float(conf[0]) / 2, float(conf[len(conf) // 2] + conf[len(conf) // 2 + 1]) / 2
    assert 0 < low < conf[0] < mid < conf[-1]
    k = int((conf < mid).sum())
    cli("match", a, tmp_path / "B", "-o", tmp_path / "ok.json", *common, "--strict",
        "--min-confidence", low)
    res = cli("match", a, tmp_path / "B", "-o", tmp_path / "s.json", *common, "--strict",
              "--min-confidence", mid, ok=False)
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("strict:")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"strict: {k} of 64 coordinates below confidence {mid:g} (")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["summary"]["n_low_confidence"] == k
    assert SignedPerm.load(tmp_path / "s.json") == SignedPerm.load(tmp_path / "true.json")
    res = cli("trajectory", a, tmp_path / "B", "-o", tmp_path / "t.json", *common,
              "--strict", "--min-confidence", mid, ok=False)
    assert res.exit_code == 1 and f"strict: {k} of 64" in res.stderr, res.output


def test_trajectory_confidence_follows_each_coordinate_through_the_charts(
        saved_pair, trained_llama, tmp_path, cli):
    """A composed coordinate's confidence is the lowest along the path it took. Exact copies
    A → B → C: every step's confidence is the self-confidence of the A coordinate carried,
    so the composed one is A's self-confidence at the composed gauge's source coordinate."""
    a = saved_pair
    cli("apply", a, tmp_path / "B", "--random", 1)
    cli("apply", tmp_path / "B", tmp_path / "C", "--random", 2)
    cli("trajectory", a, tmp_path / "B", tmp_path / "C", "-o", tmp_path / "t.json",
        "--tokens-from", tmp_path / "ids.npy", "--tokens", 4096, "--no-bridge")
    doc = json.loads((tmp_path / "t.json").read_text())
    total = SignedPerm.load(tmp_path / "t.json")
    expected = self_confidence(trained_llama.base, trained_llama.probe(4096))[total.perm]
    np.testing.assert_allclose(doc["confidence"], expected, atol=1e-5)


def _one_line_error(res, message):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_estimation_bad_inputs(saved_pair, tmp_path, cli, tiny_ckpt):
    a = saved_pair
    wide = tiny_ckpt("llama", hidden_size=32, name="narrow")
    _one_line_error(cli("match", a, wide, "-o", tmp_path / "x.json", ok=False),
                    "different hidden sizes")
    qwen = tiny_ckpt("qwen2", name="qwen")
    _one_line_error(cli("match", a, qwen, "-o", tmp_path / "x.json", ok=False),
                    "different families")
    res = cli("match", a, a, "-o", tmp_path / "x.json", "--tokens", 100, ok=False)
    _one_line_error(res, "too few tokens for the width: 100 tokens for d=64")
    assert "at least 128" in res.stderr
    _one_line_error(cli("match", a, a, "-o", tmp_path / "x.json", "--method", "magic", ok=False),
                    "unknown method")
    _one_line_error(cli("compose", tmp_path / "nope.json", "-o", tmp_path / "x.json", ok=False),
                    "not found")
    SignedPerm.random(64, 0).save(tmp_path / "g64.json")
    SignedPerm.random(32, 0).save(tmp_path / "g32.json")
    _one_line_error(cli("compose", tmp_path / "g64.json", tmp_path / "g32.json", "-o",
                        tmp_path / "x.json", ok=False), "gauge widths differ")
    assert not (tmp_path / "x.json").exists()


def test_a_trajectory_bridges_a_step_it_cannot_read(trained_llama):
    """A → B → X → C where B and C are re-gauged copies of A and X an unrelated model of the
    same shape: the steps into and out of X are flagged, the bridge B → C is exact, so the
    most confident path skips X and the composed gauge is the true one (through X it could
    not be)."""
    from gaugefix.tiny import build_tiny

    base = trained_llama.base
    gb, gc = SignedPerm.random(64, seed=21), SignedPerm.random(64, seed=22)
    x = build_tiny("llama", seed=5, hidden_size=64, intermediate_size=base.config.intermediate_size,
                   num_hidden_layers=base.config.num_hidden_layers,
                   vocab_size=base.config.vocab_size,
                   num_attention_heads=base.config.num_attention_heads,
                   num_key_value_heads=base.config.num_key_value_heads)
    chain = [base, gauge_model(base, gb), x, gauge_model(base, gc)]
    res = trajectory(chain, opts=_opts(trained_llama))
    assert res.path[0] == 0 and res.path[-1] == 3 and 2 not in res.path  # 0→1→3 or 0→3
    assert res.gauge == gc
    assert {(1, 3), (0, 3)} <= set(res.bridges)
    assert min(float(np.median(r.confidence)) for r in res.steps) > max(
        float(np.median(estimate_gauge(chain[i], chain[i + 1],
                                       opts=_opts(trained_llama)).confidence)) for i in (1, 2))
    plain = trajectory(chain, opts=_opts(trained_llama), bridge=False)
    assert plain.path == [0, 1, 2, 3] and plain.gauge != gc and not plain.bridges
