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
from rich.text import Text

from .corpus import Corpus
from .headline import headline, spread, summary_rows
from .lineage import LineageSpec, build_lineage


@dataclass(frozen=True)
class DemoConfig:
    quick: bool = False
    seed: int = 0
    seeds: int = 1  # training runs the headline figures are repeated on (mean and range)
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

    @property
    def runs(self) -> list[int]:
        """Seeds of the independent training runs the headline figures are repeated on. A
        different CPU trains a different model, as a different seed does: the spread over
        runs is how far the figures can move between machines."""
        return [self.seed + k for k in range(self.seeds)]

    def spec(self, family: str, seed: int | None = None) -> LineageSpec:
        """Trajectories: a lightly trained base (lr 3e-3) fine-tuned hard (lr 2e-2, no warm-up),
        so that two tiny runs drift apart within a few hundred steps. (With a warm-up, even at
        lr 4e-2, these tiny runs keep their coordinates for 400 steps: no drift to measure.)"""
        return LineageSpec(family, self.hidden, 2, self.base_steps, self.ft_steps, self.every,
                           2e-2, self.seed if seed is None else seed, base_lr=3e-3)

    def gentle_spec(self, family: str, seed: int | None = None) -> LineageSpec:
        """Transport: a well-trained base (lr 1e-2; it learns the sentiment coupling) and
        ordinary fine-tuning (lr 3e-3), one saved checkpoint per run."""
        return LineageSpec(family, self.hidden, 2, 400 if self.quick else 600, self.ft_steps,
                           self.ft_steps, 3e-3, self.seed if seed is None else seed,
                           base_lr=1e-2)

    @property
    def sae_steps(self) -> int:
        return 300 if self.quick else 800


def run_demo(out_dir: Path, cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    from . import experiments as ex
    from .report import write_plots, write_report
    from .steer import sentiment_prompts

    console = console or Console(markup=False, emoji=False)
    if cfg.device != "cpu":
        console.print(Text.assemble(("note:", "yellow"), " the demo's tiny models run on the "
                                    "CPU; --device only selects where a user's own "
                                    "checkpoints would run"))
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
        console.print(Text.assemble(("✓", "green"), f" {name} ({timings[name]} s)"))
        return value

    lineages = {fam: step(f"models: {fam} base and two fine-tuning runs", build_lineage,
                          cache, cfg.spec(fam), corpus) for fam in ("llama", "gpt2")}
    probe = corpus.stream(cfg.probe_tokens, cfg.seed + 77)
    matchers = {fam: ex.Matcher(lin, probe) for fam, lin in lineages.items()}
    llama, llama_m = lineages["llama"], matchers["llama"]

    results["gauge_groups"] = step("gauge groups", ex.gauge_groups, corpus, cfg.families,
                                   cfg.family_train_steps, cfg.seed, cache)
    base = llama_m.model(llama.base)
    results["ceiling"] = step("ceiling", ex.ceiling, base, probe, cfg.fractions, cfg.seed)
    results["trajectories"] = {fam: step(f"trajectories: {fam}", ex.trajectories, lin,
                                         matchers[fam]) for fam, lin in lineages.items()}

    gentle = step("models: llama, two ordinary fine-tuning runs", build_lineage, cache,
                  cfg.gentle_spec("llama"), corpus)
    gentle_m = ex.Matcher(gentle, probe)
    results.update(transport_experiments(gentle, gentle_m, corpus, cfg, cfg.seed,
                                         out_dir / "work", step))
    runs = [headline(results)]
    for seed in cfg.runs[1:]:
        runs.append(step(f"headline figures on training run {seed}", headline_of_run, cache,
                         corpus, cfg, seed, probe, out_dir / "work"))
    results["runs"] = {"seeds": cfg.runs, "figures": spread(runs)}
    results["optimizer"] = step("optimizer state", ex.optimizer_transport, base, corpus,
                                cfg.seed, 20 if cfg.quick else 50)
    positive = sentiment_prompts(corpus, True, seed=2).tolist()
    negative = sentiment_prompts(corpus, False, seed=3).tolist()
    results["audit"] = step("audit", ex.audit_claim, gentle, gentle_m, positive, negative,
                            1 if cfg.quick else 3, cfg.seed)
    results["timings_s"] = {**timings, "total": round(time.perf_counter() - t0, 1)}

    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = write_plots(results, out_dir)
    write_report(results, out_dir, plots)
    print_summary(results, console)
    console.print(f"report: {out_dir / 'report.md'} · results: {out_dir / 'results.json'} · "
                  f"plots: {', '.join(p.name for p in plots)}")
    return results


def transport_experiments(lin: Any, matcher: Any, corpus: Corpus, cfg: DemoConfig, seed: int,
                          work: Path, step: Any = None) -> dict[str, Any]:
    """SAE, steering and merges from run A's last checkpoint to run B's, with the gauge
    estimated along A → base → B (the same code for the main run and the repeats)."""
    from . import experiments as ex
    from .steer import tiny_concepts

    def run(name: str, fn: Any, *args: Any) -> Any:
        return step(name, fn, *args) if step is not None else fn(*args)

    a_last, b_last = lin.run_a[-1], lin.run_b[-1]
    estimated = matcher.chain([a_last, lin.base, b_last])
    truth = lin.true_gauge(a_last, b_last)
    model_a, model_b = matcher.model(a_last), matcher.model(b_last)
    return {
        "cross_run_gauge": {"method": "signmarg, A → base → B", "steps": cfg.ft_steps,
                            **estimated.compare(truth)},
        "sae": run("SAE transfer", ex.sae_transfer, model_a, model_b, estimated, truth, corpus,
                   seed, cfg.sae_steps),
        "steering": run("steering transfer", ex.steering_transfer, model_a, model_b, estimated,
                        tiny_concepts(corpus), 0, 64.0),
        "merge": run("merges", ex.merges, lin, estimated, corpus, work / f"run-{seed}"),
    }


def headline_of_run(cache: Path, corpus: Corpus, cfg: DemoConfig, seed: int, probe: Any,
                    work: Path) -> dict[str, float]:
    """The summary's run-dependent figures for another independent training run."""
    from . import experiments as ex

    drift = build_lineage(cache, cfg.spec("llama", seed), corpus)
    r: dict[str, Any] = {"trajectories": {"llama": ex.trajectories(
        drift, ex.Matcher(drift, probe), last_only=True)}}
    gentle = build_lineage(cache, cfg.gentle_spec("llama", seed), corpus)
    r.update(transport_experiments(gentle, ex.Matcher(gentle, probe), corpus, cfg, seed, work))
    return headline(r)


# the run-dependent figures of the summary: (key, description, format)
def print_summary(r: dict[str, Any], console: Console) -> None:
    t = Table(title=f"gaugefix demo — summary ({r['timings_s']['total']:.0f} s)")
    for col in ("experiment", "B_d / correct", "S_d / baseline", "seed paper"):
        t.add_column(col, justify="left" if col == "experiment" else "right")
    for row in summary_rows(r):
        t.add_row(*row)
    console.print(t)
