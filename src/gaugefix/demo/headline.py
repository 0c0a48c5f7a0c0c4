"""The demo's headline figures: what each run reports, their spread over seeds, and the summary
rows set beside the seed paper's (read by the run and by the report)."""

from __future__ import annotations

from typing import Any

HEADLINE = (
    ("composed", "Llama cross-run coordinates, composed", ".1%"),
    ("endpoint", "Llama cross-run coordinates, endpoint", ".1%"),
    ("via_base", "Llama cross-run coordinates, via the base", ".1%"),
    ("composed_pooled", "Llama cross-run coordinates, composed (seed paper's estimator)",
     ".1%"),
    ("endpoint_pooled", "Llama cross-run coordinates, endpoint (seed paper's estimator)",
     ".1%"),
    ("sae_B_d", "SAE NMSE on B, B_d", ".3f"),
    ("sae_S_d", "SAE NMSE on B, S_d", ".3f"),
    ("sentiment_B_d", "sentiment steering kept, B_d (%)", ".1f"),
    ("sentiment_S_d", "sentiment steering kept, S_d (%)", ".1f"),
    ("refusal_B_d", "refusal steering kept, B_d (%)", ".1f"),
    ("refusal_S_d", "refusal steering kept, S_d (%)", ".1f"),
    ("merge_B_d", "merge loss, coordinate-preserving", ".3f"),
    ("merge_S_d", "merge loss, permutation-only", ".3f"),
    ("merge_unaligned", "merge loss, unaligned", ".3f"),
)


def headline(r: dict[str, Any]) -> dict[str, float]:
    last = r["trajectories"]["llama"]["curve"][-1]
    traj, paper = last["signmarg"], last["pooled"]
    st, m = r["steering"], r["merge"]
    return {"composed": traj["composed"], "endpoint": traj["endpoint"],
            "via_base": traj["via_base"], "composed_pooled": paper["composed"],
            "endpoint_pooled": paper["endpoint"], "sae_B_d": r["sae"]["B_d_estimated"],
            "sae_S_d": r["sae"]["S_d_estimated"],
            "sentiment_B_d": st["sentiment"]["B_d_percent"],
            "sentiment_S_d": st["sentiment"]["S_d_percent"],
            "refusal_B_d": st["refusal"]["B_d_percent"],
            "refusal_S_d": st["refusal"]["S_d_percent"],
            "merge_B_d": m["coordinate_preserving"], "merge_S_d": m["permutation_only"],
            "merge_unaligned": m["unaligned"]}


def spread(runs: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per figure: the value on each run, mean, min and max."""
    import numpy as np

    return {k: {"values": [r[k] for r in runs], "mean": float(np.mean([r[k] for r in runs])),
                "min": float(min(r[k] for r in runs)), "max": float(max(r[k] for r in runs))}
            for k in runs[0]}


def _ranged(r: dict[str, Any], key: str, fmt: str) -> str:
    """The main run's value; with several runs, their mean and range."""
    f = r["runs"]["figures"][key]
    value = format(f["values"][0], fmt)
    if len(f["values"]) < 2:
        return value
    return (f"{value} (mean {format(f['mean'], fmt)} over {len(f['values'])} runs, "
            f"{format(f['min'], fmt)}–{format(f['max'], fmt)})")


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(experiment, B_d / signed, S_d / permutation-only, seed paper)."""
    steps = r["trajectories"]["llama"]["curve"][-1]["step"]
    half = next(x for x in r["ceiling"] if abs(x["positive_fraction"] - 0.5) < 1e-9)
    return [
        ("ceiling at p=0.5: perm. accuracy (signmarg vs signed)",
         f"{half['signmarg']['perm_accuracy']:.1%}", f"{half['signed']['perm_accuracy']:.1%}",
         "capped at p"),
        (f"Llama cross-run coordinates at {steps} steps (composed vs endpoint), the seed "
         "paper's estimator (co-moments pooled over positions)",
         _ranged(r, "composed_pooled", ".1%"), _ranged(r, "endpoint_pooled", ".1%"),
         "91.1% vs 60.3%"),
        ("… with gaugefix's default (positions and weights, weighed by reliability)",
         _ranged(r, "composed", ".1%"), _ranged(r, "endpoint", ".1%"), "—"),
        ("SAE NMSE on B (B_d vs S_d)", _ranged(r, "sae_B_d", ".3f"),
         _ranged(r, "sae_S_d", ".3f"), "0.004 vs 1.08"),
        ("sentiment steering effect kept, % (B_d vs S_d)", _ranged(r, "sentiment_B_d", ".1f"),
         _ranged(r, "sentiment_S_d", ".1f"), "95.8% vs 17.2%"),
        ("refusal steering effect kept, % (B_d vs S_d)", _ranged(r, "refusal_B_d", ".1f"),
         _ranged(r, "refusal_S_d", ".1f"), "reverses under S_d"),
        ("merge loss (aligned vs permutation-only; unaligned)", _ranged(r, "merge_B_d", ".3f"),
         f"{_ranged(r, 'merge_S_d', '.3f')}; {_ranged(r, 'merge_unaligned', '.3f')}", "—"),
        ("resumed AdamW deviation (signed vs permutation-only)",
         f"{r['optimizer']['signed']:.1e}", f"{r['optimizer']['permutation_only']:.1e}", "—"),
        ("audit: A's claim on re-gauged A (through gauge vs raw index)",
         f"{r['audit']['same_model_random_B_d']['transported']:.0%}",
         f"{r['audit']['same_model_random_B_d']['raw']:.0%}", "only relative to a gauge"),
    ]


# ---------------------------------------------------------------------------- --model
def _cells(r: dict[str, Any] | None) -> dict[str, str]:
    """One results.json (the tiny demo's or a pretrained model's) as the comparison table's
    cells; what a run did not measure reads "—"."""
    if r is None:
        return {}
    out: dict[str, str] = {}
    half = min(r["ceiling"], key=lambda x: abs(x["positive_fraction"] - 0.5))
    out["ceiling"] = (f"{half['signmarg']['perm_accuracy']:.1%} vs "
                      f"{half['signed']['perm_accuracy']:.1%} (p = "
                      f"{half['positive_fraction']:g})")
    # the largest drift: the last lineage (the pretrained tier's hard runs come last)
    name = list(r["trajectories"])[-1]
    last = r["trajectories"][name]["curve"][-1]
    t = last["signmarg"]
    out["trajectory"] = (f"{t['composed']:.1%} vs {t['endpoint']:.1%} (via the base "
                         f"{t['via_base']:.1%}) at {last['step']} steps")
    drift = (r.get("drift") or {}).get(name)
    if drift:
        ft = r["config"]["fine_tuning"][name]
        by = r["endpoint_by_source"][name]
        out["trajectory"] += (f", lr {ft['lr']:g}; ‖W − W_M‖/‖W_M‖ "
                              f"{drift['A'][-1]['relative_distance']:.3f} / "
                              f"{drift['B'][-1]['relative_distance']:.3f}; endpoint from "
                              f"activations alone {by['activations']:.1%}, weights alone "
                              f"{by['weights']:.1%}")
    sae = r["sae"]
    out["sae"] = (f"{sae['B_d_estimated']:.3f} vs {sae['S_d_estimated']:.3f} (unmoved "
                  f"{sae['untransported']:.3f}; on A {sae['A_original']:.3f})")
    for concept in ("sentiment", "refusal"):
        st = r["steering"].get(concept)
        out[concept] = "—" if st is None else (
            f"{st['B_d_percent']:.1f}% vs {st['S_d_percent']:.1f}% (unmoved "
            f"{st['untransported_percent']:.1f}%)")
    o = r.get("optimizer")
    if o:
        out["optimizer"] = (f"{o['signed']:.1e} vs {o['permutation_only']:.1e} (floor "
                            f"{o['rounding_floor']:.1e}, {o['steps']} steps)")
    a = r.get("audit")
    if a:
        same = a["same_model_random_B_d"]
        out["audit"] = f"{same['transported']:.0%} vs {same['raw']:.0%}"
    return out


MODEL_ROWS = (
    ("ceiling", "ceiling: permutation accuracy, sign-marginalised vs raw signed", "capped at p"),
    ("trajectory", "cross-run coordinates at the largest drift, composed vs endpoint",
     "91.1% vs 60.3% (1,500 steps)"),
    ("sae", "SAE NMSE on run B, moved by B_d vs S_d", "0.004 vs 1.08"),
    ("sentiment", "sentiment steering kept on B, B_d vs S_d", "95.8% vs 17.2%"),
    ("refusal", "refusal steering kept on B, B_d vs S_d", "reverses under S_d"),
    ("optimizer", "resumed AdamW: deviation from Q·A, signed vs permutation-only state",
     "same trajectory only under signed transport"),
    ("audit", "audit: A's top-k claim on re-gauged A, through the gauge vs raw index",
     "only relative to a gauge"),
)


def model_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(experiment, seed paper, tiny demo, the pretrained model M)."""
    mine, tiny = _cells(r), _cells(r.get("tiny"))
    return [(label, paper, tiny.get(key, "—"), mine.get(key, "—"))
            for key, label, paper in MODEL_ROWS]
