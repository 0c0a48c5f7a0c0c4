"""``gaugefix demo --model M``: the demo's experiments on a pretrained model M.

M is a checkpoint directory, a GGUF file or a hub id; its own tokenizer reads real English
that every machine has offline (:func:`.realtext.python_docs`, CPython's documentation),
split by document into training text and held-out text. On M:

* **ceiling**: planted signed permutations with positive-sign fractions p on M's own
  activations over held-out text; raw signed matching against sign-marginalised matching;
* **trajectories**: two fine-tuning runs from M (different text mixes, seeds and chart), a
  checkpoint every k steps, each saved in its own random gauge; cross-run recovery by
  endpoint, via the base and composed; how far the runs drifted (weight cosine to M, held-out
  loss, per-layer activation correlation with M);
* **transport** from run A's last checkpoint to run B's through the *estimated* gauge, against
  its permutation alone (S_d) and against nothing: an SAE trained here on A's residual stream
  at the middle layer; sentiment steering; on an instruct model a refusal-like direction;
  AdamW state, resumed in lockstep;
* **audit**: A's top-k sentiment coordinates under a gauge sweep.

Everything lands in ``results.json``, ``report.md`` and plots, with a table setting the seed
paper's figure, the embedded tiny demo's and M's side by side.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.text import Text

from ..apply import gauge_model
from ..errors import GaugefixError
from ..group import SignedPerm
from ..model import Model, open_model
from .lineage import Lineage, LineageSpec
from .realtext import RealText, python_docs


@dataclass(frozen=True)
class FineTune:
    """Two fine-tuning runs from M: ``steps`` each, a checkpoint every ``every``, AdamW ``lr``."""

    label: str
    steps: int
    every: int
    lr: float


@dataclass(frozen=True)
class ModelTierConfig:
    """Sizes of the pretrained tier. The full tier fits 40 minutes of 2 CPU cores for a
    135M-parameter model; ``quick`` 5 minutes."""

    model: str
    quick: bool = False
    seed: int = 0
    device: str = "cpu"

    def probe_tokens(self, d: int) -> int:
        """Matching's probe: 4·d tokens at least (the correlations need 2·d), in windows of
        128."""
        return max(1024 if self.quick else 4096, -(-4 * d // 128) * 128)

    @property
    def fractions(self) -> list[float]:
        return [0.1, 0.5, 0.9] if self.quick else [0.1, 0.3, 0.5, 0.7, 0.9]

    @property
    def lineages(self) -> list[FineTune]:
        """The fine-tuning runs: *ordinary* (lr 3e-4: the model learns the text, held-out loss
        falls; the transport experiments use these runs) and, in the full tier, *hard* (lr
        2e-3, no warm-up: as far as the budget pushes a 135M model's weights, at the cost of
        its function), for the trajectories alone."""
        if self.quick:
            return [FineTune("ordinary", 6, 3, 3e-4)]
        return [FineTune("ordinary", 120, 30, 3e-4), FineTune("hard", 60, 20, 2e-3)]

    @property
    def batch(self) -> tuple[int, int]:
        return (4, 64)

    @property
    def sae_tokens(self) -> tuple[int, int]:
        """(train, evaluation) tokens of the SAE's activations (held-out text, disjoint)."""
        return (4096, 2048) if self.quick else (16384, 8192)

    @property
    def sae_steps(self) -> int:
        return 200 if self.quick else 1500

    @property
    def adam(self) -> tuple[int, int]:
        """(warm steps, resumed steps) of the optimizer-state experiment."""
        return (1, 2) if self.quick else (5, 10)

    @property
    def audit_gauges(self) -> int:
        return 1 if self.quick else 3

    @property
    def steer_scale(self) -> float:
        """The steering vector is this many times the contrast direction (SmolLM2-135M: 1×
        moves sentiment by 3.0 nats and refusal by 3.8 at the middle layer; 4× garbles)."""
        return 1.0


# ---------------------------------------------------------------------------- M and its text
def open_pretrained(ref: str) -> tuple[Model, Any]:
    """M as a :class:`Model` and its own tokenizer (from the directory, the GGUF file's
    metadata, or the hub cache), or one error naming what is missing."""
    from transformers import AutoTokenizer

    m = open_model(ref).check()
    if not m.family.allows_signs:
        raise GaugefixError(f"{ref}: the experiments compare B_d with S_d, which differ only "
                            f"for RMSNorm families with per-channel gains; {m.family.name}'s "
                            f"gauge is {m.family.gauge_group}")
    path = m.path
    assert path is not None
    try:
        if m.gguf is not None:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GaugefixError(f"{ref} has no usable tokenizer (the demo reads real text with the "
                            f"model's own tokenizer): {e}") from None
    return m, tok


@dataclass(frozen=True)
class Texts:
    """The tier's text: two training mixes and held-out text, as token ids of M's tokenizer."""

    source: str
    n_bytes: int
    digest: str
    mix_a: np.ndarray
    mix_b: np.ndarray
    held: np.ndarray
    mixes: str

    def held_slice(self, start: int, n: int) -> np.ndarray:
        if start + n > len(self.held):
            raise GaugefixError(f"the held-out text has {len(self.held)} tokens; the demo needs "
                                f"{start + n}")
        return self.held[start:start + n]


def texts(tokenizer: Any, train_tokens: int, held_tokens: int) -> Texts:
    """CPython's documentation, 15% of its documents held out; the rest in two halves (the
    language reference and the first modules, the later modules): run A trains on 3 parts of
    the first half to 1 of the second, run B the other way round."""
    text = python_docs()
    train, held = text.split(0.15, seed=0)
    half = len(train.documents) // 2
    first = RealText(train.documents[:half], "first half")
    second = RealText(train.documents[half:], "second half")

    def mix(major: RealText, minor: RealText) -> np.ndarray:
        n_major = (3 * train_tokens) // 4
        return np.concatenate([major.tokens(tokenizer, n_major),
                               minor.tokens(tokenizer, train_tokens - n_major)])

    return Texts(text.source, text.n_bytes, text.digest[:12], mix(first, second),
                 mix(second, first), held.tokens(tokenizer, held_tokens),
                 "run A: 3:1 the first and second half of the training documents (sorted "
                 "order: the language reference, then the standard library's modules); run B: "
                 "1:3")


# ---------------------------------------------------------------------------- the runs
def _slug(ref: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(ref).name or ref)[:40]
    return f"{tail}-{hashlib.sha256(str(ref).encode()).hexdigest()[:8]}"


def _weight_drift(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean cosine of M's and the model's matrices (native chart), and their relative
    distance ‖W − W_M‖ / ‖W_M‖ over all parameters."""
    cos, num, den = [], 0.0, 0.0
    for k, v in model.state_dict().items():
        w0 = base[k].to(v.device).double()
        w = v.double()
        num += float((w - w0).pow(2).sum())
        den += float(w0.pow(2).sum())
        if w.ndim == 2:
            cos.append(float(torch.nn.functional.cosine_similarity(w.flatten(), w0.flatten(),
                                                                  0)))
    return {"weight_cosine": float(np.mean(cos)), "relative_distance": (num / den) ** 0.5}


@torch.no_grad()
def layer_correlation(a: torch.nn.Module, b: torch.nn.Module, ids: np.ndarray,
                      seq: int = 128) -> list[float]:
    """Per residual position (embeddings, then after each layer): the mean over coordinates
    of the correlation of coordinate i in A and in B over the tokens (the same chart)."""
    device = next(a.parameters()).device
    x = torch.from_numpy(ids[: (len(ids) // seq) * seq]).view(-1, seq).to(device)
    ha = a(x, output_hidden_states=True).hidden_states
    hb = b(x, output_hidden_states=True).hidden_states
    out = []
    for u, v in zip(ha, hb, strict=True):
        u = u.reshape(-1, u.shape[-1]).double().cpu()
        v = v.reshape(-1, v.shape[-1]).double().cpu()
        u, v = u - u.mean(0), v - v.mean(0)
        c = (u * v).sum(0) / (u.norm(dim=0) * v.norm(dim=0)).clamp_min(1e-30)
        out.append(float(c.mean()))
    return out


def fine_tune_lineage(root: Path, model: torch.nn.Module, tokenizer: Any, tx: Texts,
                      cfg: ModelTierConfig, ft: FineTune, console: Console
                      ) -> tuple[Lineage, dict[str, Any]]:
    """M (saved in a random gauge) and two fine-tuning runs, a checkpoint every ``ft.every``
    steps, each in its own random gauge; the planted gauges and the drift in ``truth.json``.
    A finished lineage with the same settings is reused."""
    from ..testing import eval_loss, train

    b, s = cfg.batch
    spec = LineageSpec(model.config.model_type, model.config.hidden_size,
                       model.config.num_hidden_layers, 0, ft.steps, ft.every, ft.lr, cfg.seed)
    root = root / f"{_slug(cfg.model)}-f{ft.steps}x{ft.every}-lr{ft.lr:g}-b{b}x{s}-s{cfg.seed}"
    n = spec.n_ckpts
    names = ["base"] + [f"{r}-{k}" for r in "AB" for k in range(1, n + 1)]
    done = root / "truth.json"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        gauges = {name: SignedPerm.random(spec.hidden_size, 10_000 * cfg.seed + i + 17)
                  for i, name in enumerate(names)}
        device = next(model.parameters()).device

        def save(m: torch.nn.Module, name: str) -> None:
            m.to("cpu")
            tmp = root / f"{name}.partial"
            gauge_model(m, gauges[name]).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(root / name)
            m.to(device)

        base_sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        held = tx.held_slice(0, 1024)
        drift: dict[str, Any] = {"base_held_out_loss": eval_loss(model, held, max_batches=4,
                                                                 batch_size=4)}
        save(model, "base")
        ends = {}
        for run, tokens, offset in (("A", tx.mix_a, 1), ("B", tx.mix_b, 2)):
            m, opt, rows = copy.deepcopy(model), None, []
            for k in range(1, n + 1):
                t0 = time.perf_counter()
                losses: list[float] = []
                opt = train(m, tokens, steps=ft.every, lr=ft.lr, batch_size=b, seq_len=s,
                            seed=1000 * (100 * cfg.seed + offset) + k, optimizer=opt,
                            on_step=lambda _, loss, ls=losses: ls.append(loss))
                rows.append({"step": k * ft.every, "train_loss": float(np.mean(losses)),
                             "held_out_loss": eval_loss(m, held, max_batches=4, batch_size=4),
                             **_weight_drift(m, base_sd)})
                save(m, f"{run}-{k}")
                console.print(f"  {ft.label} run {run}: step {k * ft.every}/{ft.steps}, train loss "
                              f"{rows[-1]['train_loss']:.3f}, held out "
                              f"{rows[-1]['held_out_loss']:.3f}, weight cosine to M "
                              f"{rows[-1]['weight_cosine']:.5f} "
                              f"({time.perf_counter() - t0:.0f} s)")
            drift[run] = rows
            ends[run] = m
        drift["activation_correlation"] = {
            run: layer_correlation(model, m, held) for run, m in ends.items()}
        drift["activation_correlation"]["A_vs_B"] = layer_correlation(ends["A"], ends["B"],
                                                                      held)
        del ends
        done.write_text(json.dumps({"spec": asdict(spec), "drift": drift, "gauges": {
            k: g.to_json() for k, g in gauges.items()}}))
    doc = json.loads(done.read_text())
    truth = {k: SignedPerm.from_json(v) for k, v in doc["gauges"].items()}
    lin = Lineage(root, spec, root / "base", [root / f"A-{k}" for k in range(1, n + 1)],
                  [root / f"B-{k}" for k in range(1, n + 1)],
                  [k * ft.every for k in range(1, n + 1)], truth)
    return lin, doc["drift"]


# ---------------------------------------------------------------------------- the tier
def check_tiny(tiny: Path | None) -> None:
    if tiny is not None and not (tiny / "results.json").is_file():
        raise GaugefixError(f"--tiny {tiny}: no results.json there (give the output directory "
                            "of `gaugefix demo`)")


def tiny_results(out_dir: Path, tiny: Path | None, cfg: ModelTierConfig,
                 console: Console) -> dict[str, Any]:
    """The embedded demo's results for the comparison column: ``tiny/results.json`` (a demo
    output directory), else ``OUT/tiny`` from an earlier run, else the embedded demo run now
    into ``OUT/tiny`` (quick with ``--quick``)."""
    from .run import DemoConfig, run_demo

    where = tiny if tiny is not None else out_dir / "tiny"
    found = where / "results.json"
    if not found.is_file():
        check_tiny(tiny)
        console.print("the embedded tiny demo, for the comparison column ...")
        run_demo(where, DemoConfig(quick=cfg.quick, seed=cfg.seed), console=console)
    try:
        return json.loads(found.read_text())
    except (OSError, ValueError) as e:
        raise GaugefixError(f"{found}: not a demo's results.json ({e})") from None


def run_model_demo(out_dir: Path, cfg: ModelTierConfig, tiny: Path | None = None,
                   console: Console | None = None) -> dict[str, Any]:
    """``gaugefix demo --model``: the embedded demo's results (for the comparison), then the
    experiments on the pretrained model."""
    console = console or Console(markup=False, emoji=False)
    check_tiny(tiny)  # every refusal before anything is written
    m, tok = open_pretrained(cfg.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    return run_model_tier(out_dir, cfg, m, tok, tiny_results(out_dir, tiny, cfg, console),
                          console)


def run_model_tier(out_dir: Path, cfg: ModelTierConfig, m: Model, tok: Any,
                   tiny: dict[str, Any] | None, console: Console | None = None
                   ) -> dict[str, Any]:
    """The experiments on ``m`` (opened by :func:`open_pretrained`, with its tokenizer)."""
    from . import experiments as ex
    from .report import write_model_report, write_plots

    console = console or Console(markup=False, emoji=False)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        console.print(f"{name} ...")
        value = fn(*args, **kw)
        timings[name] = round(time.perf_counter() - t, 1)
        console.print(Text.assemble(("✓", "green"), f" {name} ({timings[name]} s)"))
        return value

    model = step("model", m.load, "float32", cfg.device)
    model.eval()
    n_layers = model.config.num_hidden_layers
    middle = n_layers // 2
    b, s = cfg.batch
    sae_train, sae_eval = cfg.sae_tokens
    probe_n = cfg.probe_tokens(m.hidden_size)
    probe_start, sae_start = 0, probe_n
    held_need = probe_n + sae_train + sae_eval
    longest = max(ft.steps for ft in cfg.lineages)
    tx = step("real text", texts, tok, 4 * longest * b * s + 4096, held_need)
    results: dict[str, Any] = {
        "config": {"model": cfg.model, "quick": cfg.quick, "seed": cfg.seed,
                   "device": cfg.device, "family": m.family.name,
                   "hidden_size": m.hidden_size, "layers": n_layers,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "fine_tuning": {ft.label: {"steps": ft.steps, "every": ft.every,
                                              "lr": ft.lr} for ft in cfg.lineages},
                   "batch": b, "seq_len": s, "optimizer": "AdamW, betas (0.9, 0.98), no "
                   "weight decay, no warm-up"},
        "text": {"source": tx.source, "bytes": tx.n_bytes, "sha256": tx.digest,
                 "tokenizer": type(tok).__name__, "vocabulary": len(tok),
                 "train_tokens_per_run": len(tx.mix_a), "held_out_tokens": len(tx.held),
                 "mixes": tx.mixes}}
    probe = tx.held_slice(probe_start, probe_n)
    results["ceiling"] = step("ceiling", ex.ceiling, model, probe, cfg.fractions, cfg.seed,
                              device=cfg.device)
    lineages = {ft.label: step(f"fine-tuning runs: {ft.label} (lr {ft.lr:g})",
                               fine_tune_lineage, out_dir / "cache", model, tok, tx, cfg, ft,
                               console) for ft in cfg.lineages}
    del model
    results["drift"] = {label: drift for label, (_, drift) in lineages.items()}
    results["trajectories"], results["endpoint_by_source"] = {}, {}
    for label, (lin, _) in lineages.items():
        matcher = ex.Matcher(lin, probe, cfg.device)
        results["trajectories"][label] = step(f"trajectories: {label}", ex.trajectories, lin,
                                              matcher, pooled=False)
        a_last, b_last = lin.run_a[-1], lin.run_b[-1]
        truth = lin.true_gauge(a_last, b_last)
        results["endpoint_by_source"][label] = {
            source: matcher.match(a_last, b_last, "signmarg", source).gauge.compare(truth)[
                "full_accuracy"] for source in ("both", "activations", "weights")}
        if label == cfg.lineages[0].label:
            results.update(transport(matcher, lin, tok, tx, cfg, m.hidden_size, middle,
                                     sae_start, step))
        del matcher
    results["tiny"] = tiny
    results["timings_s"] = {**timings, "total": round(time.perf_counter() - t0, 1)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = write_plots(results, out_dir)
    report = write_model_report(results, out_dir, plots)
    from rich.table import Table

    from .headline import model_rows

    name = Path(cfg.model).name or cfg.model
    t = Table(title=f"gaugefix demo --model {cfg.model} ({results['timings_s']['total']:.0f} s)")
    for col in ("experiment", "seed paper", "tiny demo", name):
        t.add_column(col, justify="left" if col == "experiment" else "right")
    for row in model_rows(results):
        t.add_row(*row)
    console.print(t)
    console.print(f"report: {report} · results: {out_dir / 'results.json'} · "
                  f"plots: {', '.join(p.name for p in plots)}")
    return results


def transport(matcher: Any, lin: Lineage, tok: Any, tx: Texts, cfg: ModelTierConfig, d: int,
              middle: int, sae_start: int, step: Any) -> dict[str, Any]:
    """SAE, steering, optimizer state and audit from run A's last checkpoint to run B's, with
    the gauge estimated along A → M → B."""
    from . import english
    from . import experiments as ex

    a_last, b_last = lin.run_a[-1], lin.run_b[-1]
    estimated = matcher.chain([a_last, lin.base, b_last])
    truth = lin.true_gauge(a_last, b_last)
    out: dict[str, Any] = {"cross_run_gauge": {
        "method": "signmarg, A → base → B", "lineage": lin.spec.key, "steps": lin.steps[-1],
        **estimated.compare(truth),
        "endpoint": matcher.match(a_last, b_last).gauge.compare(truth)}}
    model_a, model_b = matcher.model(a_last), matcher.model(b_last)
    sae_train, sae_eval = cfg.sae_tokens
    ids = torch.from_numpy(tx.held_slice(sae_start, sae_train + sae_eval)).view(-1, 128)
    n_train = sae_train // 128
    out["sae"] = {"position": middle, "latents": 4 * d, "train_tokens": sae_train,
                  "eval_tokens": sae_eval, "skipped_first_tokens_per_window": 1,
                  **step("SAE transfer", ex.sae_between, model_a, model_b, estimated, truth,
                         ids[:n_train], ids[n_train:], middle, cfg.seed, cfg.sae_steps,
                         skip=1, massive=10.0)}
    sent, refusal = english.sentiment(tok), english.refusal(tok)
    concepts = [c for c in (sent, refusal) if c is not None]
    out["steering"] = {
        "layer": middle - 1, "scale": cfg.steer_scale,
        "concepts": {c.name: c.description for c in concepts},
        **step("steering transfer", ex.steering_transfer, model_a, model_b, estimated,
               concepts, middle - 1, cfg.steer_scale)}
    if refusal is None:
        out["steering"]["refusal_skipped"] = ("the tokenizer has no chat template (not an "
                                              "instruct model)")
    warm, resumed = cfg.adam
    b, s = cfg.batch
    batches = torch.from_numpy(tx.mix_a[: (warm + resumed) * b * s].copy()).view(-1, b, s)
    out["optimizer"] = step(
        "optimizer state", ex.optimizer_resume, model_a, batches, warm, cfg.seed,
        lin.spec.ft_lr, _weights_gauge)
    del model_a, model_b
    out["audit"] = step("audit", ex.audit_claim, lin, matcher, sent.positive, sent.negative,
                        cfg.audit_gauges, cfg.seed, middle)
    return out


def _weights_gauge(a: torch.nn.Module, b: torch.nn.Module) -> SignedPerm:
    """The gauge A → B from the weights alone (read on the CPU; ``a`` stays where it is)."""
    from ..estimate import match_weights

    on_cpu = [m if next(m.parameters()).device.type == "cpu" else copy.deepcopy(m).cpu()
              for m in (a, b)]
    return match_weights(*on_cpu).gauge
