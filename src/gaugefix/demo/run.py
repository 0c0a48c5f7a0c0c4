"""``gaugefix demo``: reproduce the seed paper's headline results on an embedded default.

Everything is generated and trained locally (nothing is downloaded): a corpus
from a small grammar, tiny Llama-family (RMSNorm) and GPT-2 (LayerNorm) models,
two fine-tuning runs from each base with every checkpoint in its own random gauge.
Writes ``report.md``, ``results.json`` and PNG plots into the output directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .corpus import Corpus
from .lineage import LineageSpec, build_lineage


@dataclass(frozen=True)
class DemoConfig:
    quick: bool = False
    seed: int = 0
    device: str = "cpu"

    @property
    def hidden(self) -> int:
        return 64

    @property
    def base_steps(self) -> int:
        return 200 if self.quick else 300

    @property
    def ft_steps(self) -> int:
        return 120 if self.quick else 400

    @property
    def every(self) -> int:
        return 20 if self.quick else 25

    @property
    def probe_tokens(self) -> int:
        return 4096 if self.quick else 8192

    @property
    def families(self) -> list[str]:
        from .experiments import all_families

        return ["llama", "gemma2", "gpt2", "olmo"] if self.quick else all_families()

    @property
    def family_train_steps(self) -> int:
        return 20 if self.quick else 30

    @property
    def fractions(self) -> list[float]:
        return [0.0, 0.25, 0.5, 0.75, 1.0] if self.quick else [i / 8 for i in range(9)]

    def spec(self, family: str) -> LineageSpec:
        """Trajectories: a lightly trained base (lr 3e-3) fine-tuned hard (lr 2e-2, no warm-up),
        so that two tiny runs drift apart within a few hundred steps. (With a warm-up, even at
        lr 4e-2, these tiny runs keep their coordinates for 400 steps: no drift to measure.)"""
        return LineageSpec(family, self.hidden, 2, self.base_steps, self.ft_steps, self.every,
                           2e-2, self.seed, base_lr=3e-3)

    def gentle_spec(self, family: str) -> LineageSpec:
        """Transport: a well-trained base (lr 1e-2; it learns the sentiment coupling) and
        ordinary fine-tuning (lr 3e-3), one saved checkpoint per run."""
        return LineageSpec(family, self.hidden, 2, 400 if self.quick else 600, self.ft_steps,
                           self.ft_steps, 3e-3, self.seed, base_lr=1e-2)


def run_demo(out_dir: Path, cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    from . import experiments as ex
    from .report import write_plots, write_report

    console = console or Console()
    if cfg.device != "cpu":
        console.print("[yellow]note:[/] the demo's tiny models run on the CPU; --device only "
                      "selects where a user's own checkpoints would run")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "cache"
    corpus = Corpus()
    t0 = time.perf_counter()
    results: dict[str, Any] = {"config": {"quick": cfg.quick, "seed": cfg.seed,
                                          "hidden_size": cfg.hidden, "layers": 2}}
    timings: dict[str, float] = {}

    def step(name: str, fn, *args: Any) -> Any:  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        with console.status(f"{name} ..."):
            value = fn(*args)
        timings[name] = round(time.perf_counter() - t, 1)
        console.print(f"[green]✓[/] {name} ({timings[name]} s)")
        return value

    lineages = {fam: step(f"models: {fam} base and two fine-tuning runs", build_lineage,
                          cache, cfg.spec(fam), corpus) for fam in ("llama", "gpt2")}
    probe = corpus.stream(cfg.probe_tokens, cfg.seed + 77)
    matchers = {fam: ex.Matcher(lin, probe) for fam, lin in lineages.items()}
    llama, llama_m = lineages["llama"], matchers["llama"]

    results["gauge_groups"] = step("gauge groups", ex.gauge_groups, corpus, cfg.families,
                                   cfg.family_train_steps, cfg.seed)
    base = llama_m.model(llama.base)
    results["ceiling"] = step("ceiling", ex.ceiling, base, probe, cfg.fractions, cfg.seed)
    results["trajectories"] = {fam: step(f"trajectories: {fam}", ex.trajectories, lin,
                                         matchers[fam]) for fam, lin in lineages.items()}

    gentle = step("models: llama, two ordinary fine-tuning runs", build_lineage, cache,
                  cfg.gentle_spec("llama"), corpus)
    gentle_m = ex.Matcher(gentle, probe)
    a_last, b_last = gentle.run_a[-1], gentle.run_b[-1]
    estimated = gentle_m.chain([a_last, gentle.base, b_last])
    truth = gentle.true_gauge(a_last, b_last)
    results["cross_run_gauge"] = {"method": "signmarg, A → base → B", "steps":
                                  cfg.ft_steps, **estimated.compare(truth)}
    model_a, model_b = gentle_m.model(a_last), gentle_m.model(b_last)
    results["sae"] = step("SAE transfer", ex.sae_transfer, model_a, model_b, estimated, truth,
                          corpus, cfg.seed, 300 if cfg.quick else 800)
    results["steering"] = step("steering transfer", ex.steering_transfer, model_a, model_b,
                               estimated, corpus, 64.0)
    results["merge"] = step("merges", ex.merges, gentle, estimated, corpus, out_dir / "work")
    results["optimizer"] = step("optimizer state", ex.optimizer_transport, base, corpus,
                                cfg.seed, 20 if cfg.quick else 50)
    results["audit"] = step("audit", ex.audit_claim, gentle, gentle_m, corpus,
                            1 if cfg.quick else 3, cfg.seed)
    results["timings_s"] = {**timings, "total": round(time.perf_counter() - t0, 1)}

    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = write_plots(results, out_dir)
    write_report(results, out_dir, plots)
    print_summary(results, console)
    console.print(f"report: {out_dir / 'report.md'} · results: {out_dir / 'results.json'} · "
                  f"plots: {', '.join(p.name for p in plots)}")
    return results


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(experiment, B_d / signed, S_d / permutation-only, seed paper)."""
    traj = r["trajectories"]["llama"]["curve"][-1]["signmarg"]
    steps = r["trajectories"]["llama"]["curve"][-1]["step"]
    half = next(x for x in r["ceiling"] if abs(x["positive_fraction"] - 0.5) < 1e-9)
    return [
        ("ceiling at p=0.5: perm. accuracy (signmarg vs signed)",
         f"{half['signmarg']['perm_accuracy']:.1%}", f"{half['signed']['perm_accuracy']:.1%}",
         "capped at p"),
        (f"Llama cross-run coordinates at {steps} steps (composed vs endpoint)",
         f"{traj['composed']:.1%}", f"{traj['endpoint']:.1%}", "91.1% vs 60.3%"),
        ("SAE NMSE on B (B_d vs S_d)", f"{r['sae']['B_d_estimated']:.3f}",
         f"{r['sae']['S_d_estimated']:.3f}", "0.004 vs 1.08"),
        ("sentiment steering effect kept (B_d vs S_d)",
         f"{r['steering']['sentiment']['B_d_percent']:.1f}%",
         f"{r['steering']['sentiment']['S_d_percent']:.1f}%", "95.8% vs 17.2%"),
        ("refusal steering effect kept (B_d vs S_d)",
         f"{r['steering']['refusal']['B_d_percent']:.1f}%",
         f"{r['steering']['refusal']['S_d_percent']:.1f}%", "reverses under S_d"),
        ("merge loss (aligned vs permutation-only; unaligned)",
         f"{r['merge']['coordinate_preserving']:.3f}",
         f"{r['merge']['permutation_only']:.3f}; {r['merge']['unaligned']:.3f}", "—"),
        ("resumed AdamW deviation (signed vs permutation-only)",
         f"{r['optimizer']['signed']:.1e}", f"{r['optimizer']['permutation_only']:.1e}", "—"),
        ("audit: A's claim on re-gauged A (through gauge vs raw index)",
         f"{r['audit']['same_model_random_B_d']['transported']:.0%}",
         f"{r['audit']['same_model_random_B_d']['raw']:.0%}", "only relative to a gauge"),
    ]


def print_summary(r: dict[str, Any], console: Console) -> None:
    t = Table(title=f"gaugefix demo — summary ({r['timings_s']['total']:.0f} s)")
    for col in ("experiment", "B_d / correct", "S_d / baseline", "seed paper"):
        t.add_column(col, justify="left" if col == "experiment" else "right")
    for row in summary_rows(r):
        t.add_row(*row)
    console.print(t)
