"""Shared fixtures: tiny offline models and an in-process CLI runner."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs one pytest-xdist worker per core: each then computes on one thread (and so
# do the gaugefix, torchrun and wheel processes the tests start, through OMP_NUM_THREADS),
# since two workers each spinning two threads on two cores oversubscribe them
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("GAUGEFIX_TEST_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["GAUGEFIX_TEST_THREADS"])
torch.set_num_threads(int(os.environ.get("GAUGEFIX_TEST_THREADS", "2")))

import transformers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from gaugefix.arch import families, get_family  # noqa: E402
from gaugefix.cli import app  # noqa: E402
from gaugefix.tiny import build_tiny  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

# Seconds the heaviest test files take on one worker (one thread, a 2-core machine, measured
# 2026-12-03 from the suite's junit report: 647 s in all). `make test` hands whole files to
# the workers (--dist loadfile) in collection order (--no-loadscope-reorder: pytest-xdist
# would otherwise order files by their number of tests, and the 5 tests of the demo, 101 s,
# started last); these go first, longest first, so that the run does not end with one worker
# on a long file and the other idle. Stale figures cost time, never a result.
FILE_SECONDS = {
    "test_demo.py": 125, "test_gguf.py": 99, "test_scale.py": 96, "test_wheel.py": 90,
    "test_estimation.py": 64, "test_families.py": 42, "test_mergekit.py": 40,
    "test_coverage.py": 29, "test_bad_inputs.py": 25, "test_transport_training.py": 24,
    "test_hostile_sweep3.py": 22, "test_evidence.py": 20, "test_hub_offline.py": 19,
    "test_canonical.py": 17, "test_outputs.py": 14, "test_quant_hf_checkpoint.py": 6,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(item.path.name, i)
    # a stable sort: each file's tests keep their order
    items.sort(key=lambda it: (-FILE_SECONDS.get(it.path.name, 0), first[it.path.name]))

FAMILIES = sorted(families())  # from the table: a family added there is tested here
# from the architecture map; test_families checks the map's groups against the real models
LAYERNORM_FAMILIES = [f for f in FAMILIES if not get_family(f).allows_signs]


class Cli:
    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: object, ok: bool = True):
        result = self.runner.invoke(app, [str(a) for a in args])
        if ok and result.exit_code != 0:
            raise AssertionError(
                f"gaugefix {' '.join(map(str, args))} exited {result.exit_code}:\n"
                f"{result.output}\n{result.stderr if result.stderr_bytes else ''}\n"
                f"{result.exception!r}"
            )
        return result


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def tiny_ckpt(tmp_path):
    def make(family: str, seed: int = 0, generic: bool = True, name: str | None = None,
             **model_kw) -> Path:
        path = tmp_path / (name or f"{family}-{seed}")
        build_tiny(family, seed=seed, generic=generic, **model_kw).save_pretrained(path)
        return path

    return make


# ---------------------------------------------------------------------------- trained models
# Floating-point kernels differ between CPUs, so a model trained here is another model
# elsewhere. No test may hinge on one training run turning out a particular way: each trained
# fixture establishes the property its tests use (training further where that is the remedy)
# and otherwise fails saying that the fixture, not gaugefix, is at fault. GAUGEFIX_TEST_SEED
# runs the whole suite on other training runs.
SEED = int(os.environ.get("GAUGEFIX_TEST_SEED", "0"))


def fixture_failed(name: str, what: str) -> None:
    pytest.fail(f"fixture {name}: {what}. The fixture's training did not produce the property "
                "its tests rely on; this is not a failure of gaugefix", pytrace=False)


class Lineage:
    """A trained base and two fine-tuning runs from it, checkpoints kept in memory."""

    def __init__(self, family: str, *, base_steps: int, base_lr: float, d: int = 64,
                 seed: int = SEED) -> None:
        from gaugefix.demo.corpus import Corpus
        from gaugefix.testing import MIX_A, MIX_B, corpus_model

        self.corpus = Corpus()
        self.d, self.seed, self.base_lr = d, seed, base_lr
        self.base = corpus_model(family, self.corpus.vocab_size, hidden_size=d, seed=seed)
        self.base_opt = None
        self.base_steps = 0
        self.train_base(base_steps)
        self.mixes = {"A": MIX_A, "B": MIX_B}
        self.runs: dict[str, list] = {"A": [], "B": []}
        self._run_state: dict[str, tuple] = {}
        self.every = 0

    def train_base(self, steps: int) -> None:
        from gaugefix.testing import train

        self.base_opt = train(self.base, self.corpus.stream(100_000, self.seed), steps=steps,
                              lr=self.base_lr, seed=self.seed + 17 * self.base_steps,
                              optimizer=self.base_opt)
        self.base_steps += steps

    def extend(self, n: int, *, every: int, lr: float) -> None:
        """``n`` more checkpoints on each run, ``every`` steps apart."""
        import copy

        from gaugefix.testing import train

        self.every = every
        for k, run in enumerate(self.runs, start=1):
            model, opt = self._run_state.get(run, (copy.deepcopy(self.base), None))
            tokens = self.corpus.stream(100_000, 10 * k + self.seed, self.mixes[run])
            for _ in range(n):
                step = len(self.runs[run])
                opt = train(model, tokens, steps=every, lr=lr, seed=100 * k + step + self.seed,
                            optimizer=opt)
                self.runs[run].append(copy.deepcopy(model))
            self._run_state[run] = (model, opt)

    def fork(self, seed: int) -> Lineage:
        """Another lineage from a copy of this base: fine-tuning runs with another seed."""
        import copy

        other = copy.copy(self)
        other.base = copy.deepcopy(self.base)
        other.seed = seed
        other.runs, other._run_state = {"A": [], "B": []}, {}
        return other

    def probe(self, n: int = 4096, seed: int = 77):
        return self.corpus.stream(n, seed)

    def native_match(self, a, b, n_tokens: int = 4096) -> float:
        """Full accuracy of the estimated gauge between two checkpoints that share a chart
        (native checkpoints of one lineage: the truth is the identity)."""
        from gaugefix.estimate import StatsOptions, estimate_gauge
        from gaugefix.group import SignedPerm

        est = estimate_gauge(a, b, opts=StatsOptions(tokens=self.probe(n_tokens),
                                                     n_tokens=n_tokens)).gauge
        return est.compare(SignedPerm.identity(self.d))["full_accuracy"]


def self_confidence(model, tokens):
    """Per coordinate of A: the confidence gaugefix reports for matching A with itself (the
    identity). The combined evidence is equivariant, so matching an exact copy B = Q·A reports
    at B's coordinate i exactly this at A's perm[i]."""
    from gaugefix.estimate import StatsOptions, estimate_gauge
    from gaugefix.group import SignedPerm

    r = estimate_gauge(model, model, opts=StatsOptions(tokens=tokens, n_tokens=len(tokens)))
    assert r.gauge == SignedPerm.identity(r.gauge.d), "a model matched with itself"
    return r.confidence


def max_coordinate_correlation(model, tokens) -> float:
    """The largest |corr| between two distinct residual coordinates (pooled positions): below
    1, planted gauges of exact copies are recovered exactly."""
    from gaugefix.stats import collect_stats

    c = collect_stats(model, model, tokens).pooled.correlation().abs()
    c.fill_diagonal_(0)
    return float(c.max())


def sentiment_steering(lin: Lineage) -> tuple[int, torch.Tensor, float, float]:
    """(layer, v, effect of +v, effect of −v) for the contrastive sentiment direction after
    the decoder layer where it steers best both ways (a run may carry sentiment to the last
    token in layer 0 or only in layer 1)."""
    from gaugefix.demo.steer import sentiment_direction, sentiment_effect

    best = None
    for layer in range(lin.base.config.num_hidden_layers):
        v = 64 * sentiment_direction(lin.base, lin.corpus, layer)
        up = sentiment_effect(lin.base, lin.corpus, layer, v)
        down = sentiment_effect(lin.base, lin.corpus, layer, -v)
        if best is None or min(up, -down) > min(best[2], -best[3]):
            best = (layer, v, up, down)
    assert best is not None
    return best


# an exact copy B = Q·A is recovered exactly whenever no two of A's coordinates are collinear
# (the matched score 1 beats every alternative); 1e-3 of margin dwarfs float32 rounding
MAX_CORRELATION = 0.999


def _distinguishable(name: str, lin: Lineage) -> None:
    rho = max_coordinate_correlation(lin.base, lin.probe())
    if rho >= MAX_CORRELATION:
        fixture_failed(name, f"two residual coordinates correlate at {rho:.3f} (≥ "
                       f"{MAX_CORRELATION}): nearly collinear, so planted gauges are not "
                       "determined")


@pytest.fixture(scope="session")
def trained_llama():
    """A Llama-family model trained on the generated corpus, established to have
    (1) a sentiment direction after layer 0 that steers both ways: +v raises the
    positive-verb log-odds, −v lowers them, and (2) distinguishable residual coordinates."""
    lin = Lineage("llama", base_steps=400, base_lr=1e-2)
    for _ in range(4):
        lin.sentiment = sentiment_steering(lin)
        _, _, up, down = lin.sentiment
        rho = max_coordinate_correlation(lin.base, lin.probe())
        if up > 0.05 and down < -0.05 and rho < MAX_CORRELATION:
            return lin
        lin.train_base(200)
    fixture_failed("trained_llama", f"after {lin.base_steps} steps the best sentiment direction "
                   f"steers by {up:+.3f} / {down:+.3f} (needs > +0.05 along +v and < -0.05 "
                   f"along -v) and two coordinates correlate at {rho:.3f} (needs < "
                   f"{MAX_CORRELATION})")


@pytest.fixture(scope="session")
def trained_gpt2():
    """A GPT-2 model trained on the corpus, with distinguishable residual coordinates."""
    lin = Lineage("gpt2", base_steps=300, base_lr=3e-3)
    _distinguishable("trained_gpt2", lin)
    return lin


@pytest.fixture(scope="session")
def drift_lineage(trained_llama):
    """Two runs fine-tuned hard (no warm-up) from trained_llama's base, established to
    (1) drift apart: their native endpoints match below 0.99, and (2) move little per saved
    step: every consecutive native pair (base → first checkpoints included) matches exactly.
    Whether a given run gives both depends on the CPU's kernels and on how well the default
    estimator reads drifted pairs: learning rates and seeds are tried until one does."""
    tried = []
    for attempt, lr in enumerate((6e-2, 6e-2, 1e-1, 1e-1)):
        lin = trained_llama.fork(SEED + 1000 * attempt)
        lin.extend(24, every=10, lr=lr)
        endpoint = lin.native_match(lin.runs["A"][-1], lin.runs["B"][-1])
        local = [lin.native_match(x, y) for run in ("A", "B")
                 for x, y in itertools.pairwise([lin.base, *lin.runs[run]])]
        worst = min(local)
        if endpoint < 0.99 and worst == 1.0:
            lin.endpoint_accuracy = endpoint
            return lin
        tried.append(f"seed {lin.seed}, lr {lr:g}: endpoint {endpoint:.3f}, worst local step "
                     f"{worst:.3f}")
    fixture_failed("drift_lineage", "no fine-tuning seed gave drifted endpoints with exactly "
                   f"matchable local steps ({'; '.join(tried)})")
