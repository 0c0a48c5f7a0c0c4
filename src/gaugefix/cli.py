"""Command-line interface: a thin layer over the API.

Every user error is a :class:`GaugefixError` (or a usage error, or an OSError),
printed as one line (``error: ...``) with exit status 2; a failed check
(``verify``) exits 1; SIGINT, SIGTERM and SIGHUP remove every partial output and
exit 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

try:  # typer vendors click from 0.2x on; before, it used click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import ClickException, NoArgsIsHelpError

from .errors import GaugefixError, GaugefixWarning
from .registry import check_options, kinds_help, methods_help, transport_kind, weight_help


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: unwinds like Ctrl-C, so every output is cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _OneLineGroup(TyperGroup):
    """Usage errors (a missing argument, a value out of range) as one ``error:`` line and
    exit 2, like every other bad input."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            code = exc.exit_code
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _error_line(exc.format_message() + hint)
            code = exc.exit_code
        except typer.Abort:
            _error_line("aborted")
            code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_OneLineGroup,
    help="Fix the residual-stream gauge of transformer checkpoints and move coordinate-"
    "indexed objects between them. Convention: x_B[i] = sign[i] * x_A[perm[i]].",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _error_line(message: object) -> None:
    err.print(f"[bold red]error:[/] {escape(_one_line(message))}", soft_wrap=True)


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    err.print(f"[bold yellow]warning:[/] {escape(_one_line(message))}", soft_wrap=True)


def _quiet_libraries() -> None:
    """Silence transformers' logging and progress bars through the environment it reads when
    imported: commands that never load a model (apply, transport, ...) never import it,
    which saves about a second of start-up."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "offloaded to the disk" notes
    if "transformers" in sys.modules:  # already imported (an in-process caller)
        transformers = sys.modules["transformers"]
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind the command like Ctrl-C (outputs cleaned up); once one
    arrived, further ones are ignored so that the clean-up itself is not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [s for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]
    nums = [getattr(signal, s) for s in sigs]

    def handler(signum: int, frame: Any) -> None:
        for n in nums:
            signal.signal(n, signal.SIG_IGN)
        raise Interrupted(signum)

    old = {n: signal.signal(n, handler) for n in nums}
    try:
        yield
    finally:
        for n, h in old.items():
            signal.signal(n, h)


@contextlib.contextmanager
def _quiet_unless_main_rank() -> Iterator[None]:
    """Under torchrun every rank computes the same result: rank 0 alone reports it."""
    from .io import is_main_rank

    if is_main_rank():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        file = out.file
        out.file = devnull
        try:
            yield
        finally:
            out.file = file


def _existing_paths(value: Any) -> list[Path]:
    items = value if isinstance(value, list | tuple) else [value]
    return [Path(v) for v in items if isinstance(v, str | Path) and os.path.lexists(v)]


def command(*, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Register a command. ``inputs``/``outputs`` name its path parameters: outputs are
    checked (existence, overlap with any input) before any work, and everything the command
    writes is published together when it succeeds, or not at all. A GaugefixError or an
    OSError becomes one ``error:`` line and exit 2; a signal, one line and 128+signum."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from .distributed import barrier
            from .io import is_main_rank, transaction

            code = 0
            try:
                with _signals_unwind(), warnings.catch_warnings():
                    warnings.simplefilter("always", GaugefixWarning)
                    warnings.showwarning = _show_warning
                    _quiet_libraries()
                    # commands that declare outputs publish them together; the demo writes
                    # its work products as it goes, each one atomically
                    tx_or_none = transaction([p for n in inputs
                                              for p in _existing_paths(kwargs.get(n))]
                                             ) if outputs else contextlib.nullcontext()
                    with tx_or_none as tx:
                        named = [Path(kwargs[n]) for n in outputs if kwargs.get(n) is not None]
                        for k, path in enumerate(named):  # refused before any work
                            tx.check(path, bool(kwargs.get("overwrite")), named[:k])
                        try:
                            with _quiet_unless_main_rank():
                                fn(*args, **kwargs)
                        except typer.Exit as exc:  # the command's own verdict
                            code = exc.exit_code
                        barrier()  # under torchrun: publish only if every rank got here
                    if is_main_rank():
                        for line in _after_commit.get():
                            out.print(line)
            except GaugefixError as exc:
                _error_line(exc)
                raise typer.Exit(2) from None
            except Interrupted as exc:
                cleaned = "; nothing was written (temporary outputs removed)" if outputs else ""
                _error_line(f"interrupted by {signal.Signals(exc.signum).name}{cleaned}")
                raise typer.Exit(128 + exc.signum) from None
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename else ""
                _error_line(f"{where}{exc.strerror or exc}")
                raise typer.Exit(2) from None
            finally:
                _after_commit.set(())
            if code:
                raise typer.Exit(code)

        app.command()(wrapper)
        return fn

    return register


_after_commit: ContextVar[tuple[str, ...]] = ContextVar("gaugefix_after_commit", default=())


def written(line: str) -> None:
    """Say what was written, once it really is (after the outputs are published)."""
    _after_commit.set((*_after_commit.get(), line))


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _range(lo: float | None = None, hi: float | None = None) -> Callable[[Any], Any]:
    """An option callback refusing non-finite values and values outside [lo, hi], with a
    message that names the value and the rule."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number")
        if lo is not None and value < lo:
            raise typer.BadParameter(f"{value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise typer.BadParameter(f"{value} is above the maximum {hi}")
        return value

    return check


# ---------------------------------------------------------------------------- inspect
@command(inputs=("model",))
def inspect(
    model: Annotated[str, typer.Argument(help="checkpoint directory or hub id")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Family, norm kind, hidden size, gauge group, and gain-genericity diagnosis."""
    from .diagnosis import inspect_checkpoint

    rep = inspect_checkpoint(model)
    if as_json:
        _print_json(rep.to_dict())
        return
    t = Table(show_header=False, box=None)
    t.add_row("family", f"{rep.family} (model_type {rep.model_type})")
    t.add_row("norm", rep.norm_description)
    t.add_row("hidden size d", str(rep.hidden_size))
    t.add_row("gauge group", f"{rep.gauge_group} (among signed permutations, generic gains)")
    t.add_row("tied embeddings", str(rep.tied_embeddings))
    t.add_row("norm vectors", f"{rep.n_norm_vectors} (fingerprint d×{rep.n_norm_vectors})")
    t.add_row("tied coordinates", f"{rep.n_tied_coordinates} in {len(rep.tie_groups)} groups")
    if rep.min_separation is not None:
        t.add_row("closest pair", f"{rep.closest_pair} at max|Δ| = {rep.min_separation:.3g}")
    out.print(t)
    for w in rep.warnings:
        err.print(f"[bold yellow]warning:[/] {w}", soft_wrap=True)


# ---------------------------------------------------------------------------- identity
DiscreteOnly = Annotated[bool, typer.Option(
    help="where every gain is equal (untrained, or a family without gains) rotations are "
    "symmetries too and no canonical chart exists: use the chart canonical for signed "
    "permutations alone")]


@command(inputs=("model",), outputs=("output",))
def canonicalize(
    model: Annotated[str, typer.Argument(help="checkpoint directory or hub id")],
    output: Annotated[Path, typer.Argument(help="output directory (the canonical chart)")],
    discrete_only: DiscreteOnly = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the gauge and what the "
                                          "weights leave open as JSON")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Write MODEL in its canonical chart: gauge-equivalent checkpoints give identical bytes."""
    from .canonical import canonicalize as run

    chart = run(model, output, overwrite=overwrite, discrete_only=discrete_only)
    if as_json:
        _print_json({"family": chart.family, "canonical": chart.defined,
                     "gauge": chart.gauge.to_json(), "open": chart.describe()})
    for line in chart.describe():
        err.print(f"[bold yellow]note:[/] {escape(line)}", soft_wrap=True)
    written(f"canonical chart written to {output}")


@command(inputs=("model",))
def fingerprint(
    model: Annotated[str, typer.Argument(help="checkpoint directory or hub id")],
    discrete_only: DiscreteOnly = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """A gauge-invariant identifier: equal for re-gauged copies, changed by any weight."""
    from .canonical import fingerprint as run

    fp = run(model, discrete_only=discrete_only)
    if as_json:
        _print_json(fp.to_dict())
        return
    out.print(fp.fingerprint)
    for line in fp.chart.describe():
        err.print(f"[bold yellow]note:[/] {escape(line)}", soft_wrap=True)


@command(inputs=("model_a", "model_b"))
def identify(
    model_a: Annotated[str, typer.Argument(help="checkpoint A")],
    model_b: Annotated[str, typer.Argument(help="checkpoint B")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Same function up to gauge, derived (e.g. fine-tuned), or unrelated: from weights alone."""
    from .canonical import identify as run

    r = run(model_a, model_b)
    if as_json:
        _print_json({"verdict": r.verdict, "reason": r.reason,
                     "gauge": None if r.gauge is None else r.gauge.to_json(), **r.evidence})
        return
    out.print(f"{r.verdict}: {r.reason}")


# ---------------------------------------------------------------------------- apply
@command(inputs=("model", "gauge"), outputs=("output", "gauge_out"))
def apply(
    model: Annotated[str, typer.Argument(help="checkpoint directory (chart A) or hub id")],
    output: Annotated[Path, typer.Argument(help="output directory (chart B)")],
    gauge: Annotated[Path | None, typer.Option(help="gauge file to apply")] = None,
    random: Annotated[int | None, typer.Option("--random", callback=_range(0), help="apply a "
                      "random gauge "
                      "drawn with this seed (B_d for RMSNorm, S_d×{±1} for LayerNorm)")] = None,
    kind: Annotated[str | None, typer.Option(help="random gauge kind: signed, perm or "
                    "global (default: the family's full group)")] = None,
    positive_fraction: Annotated[float | None, typer.Option(
        callback=_range(0, 1), help="random signed gauge: fraction of +1 signs")] = None,
    gauge_out: Annotated[Path | None, typer.Option(help="write the applied gauge here")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing outputs")] = False,
) -> None:
    """Write MODEL in another gauge: same function, weights gathered and sign-flipped."""
    from .apply import checkpoint_identity, gauge_checkpoint
    from .checkpoint import Checkpoint
    from .group import SignedPerm

    if (gauge is None) == (random is None):
        raise GaugefixError("give exactly one of --gauge G.json or --random SEED")
    ckpt = Checkpoint.open(model)
    if gauge is not None:
        if kind is not None or positive_fraction is not None:
            raise GaugefixError("--kind and --positive-fraction only go with --random")
        g = SignedPerm.load(gauge)
        method = f"file:{gauge}"
    else:
        k = kind or ("signed" if ckpt.family.allows_signs else "global")
        g = SignedPerm.random(ckpt.hidden_size, random, kind=k,  # type: ignore[arg-type]
                              positive_fraction=positive_fraction)
        method = f"random(seed={random}, kind={k})"
    ckpt.family.check_gauge(g, ckpt.hidden_size)
    rep = gauge_checkpoint(ckpt.path, output, g, overwrite=overwrite,
                           identities=gauge_out is not None)
    written(
        f"{rep.family}: d={rep.d}, {rep.n_transformed}/{rep.n_tensors} tensors transformed "
        f"({', '.join(f'{k}×{n}' for k, n in sorted(rep.ops.items()))}) in {rep.shards} "
        f"shard(s), {rep.bytes_written / 1e6:.1f} MB → {output}"
    )
    if rep.n_tower:
        written(f"{rep.n_tower} tensors of the vision/audio tower(s) left as they are (they "
                "never touch the text model's residual stream)")
    if gauge_out is not None:
        meta = {"source": checkpoint_identity(ckpt.path, rep.source_sha256),
                "target": {"name": str(output), "sha256": rep.sha256}, "method": method}
        g.save(gauge_out, meta, overwrite=overwrite)
        written(f"gauge written to {gauge_out}")


# ---------------------------------------------------------------------------- verify
@command(inputs=("model_a", "model_b", "gauge"))
def verify(
    model_a: Annotated[str, typer.Argument(help="checkpoint in chart A")],
    model_b: Annotated[str, typer.Argument(help="checkpoint in chart B")],
    gauge: Annotated[Path, typer.Option(help="gauge A → B")],
    tokens: Annotated[int, typer.Option(callback=_range(1), help="number of probe tokens")] = 256,
    tol: Annotated[float, typer.Option(callback=_range(0), help="maximum relative error")
                   ] = 1e-4,
    dtype: Annotated[str, typer.Option(help="float32, float64, bfloat16, float16")] = "float32",
    seed: Annotated[int, typer.Option(callback=_range(0), help="probe-token seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check that MODEL_B computes MODEL_A's function in chart B (logits, all hidden states)."""
    from .group import SignedPerm
    from .verify import verify_checkpoints

    g = SignedPerm.load(gauge)
    rep = verify_checkpoints(model_a, model_b, g, n_tokens=tokens, tol=tol, dtype=dtype,
                             seed=seed)
    if as_json:
        _print_json(rep.to_dict())
    else:
        t = Table(title=f"max relative error on {rep.n_tokens} probe tokens ({dtype})")
        t.add_column("output")
        t.add_column("rel. err", justify="right")
        t.add_row("logits", f"{rep.logits_rel_err:.2e}")
        for i, e in enumerate(rep.hidden_rel_err):
            t.add_row(f"hidden_states[{i}]", f"{e:.2e}")
        out.print(t)
        verdict = "[green]PASS[/]" if rep.passed else "[red]FAIL[/]"
        out.print(f"{verdict}: max {rep.max_rel_err:.2e} (tol {tol:.0e})")
    if not rep.passed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- estimation
TokensFrom = Annotated[str | None, typer.Option(
    "--tokens-from", help="token source: a text file or directory (tokenised with MODEL_A's "
    "tokenizer), token ids in .npy/.pt, or 'synthetic' (default)")]
NTokens = Annotated[int, typer.Option("--tokens", callback=_range(1), help="number of tokens")]
SeqLen = Annotated[int, typer.Option(callback=_range(1), help="sequence length")]
BatchSize = Annotated[int, typer.Option(callback=_range(1), help="sequences per forward pass")]
Device = Annotated[str, typer.Option(help="cpu or cuda")]
DType = Annotated[str, typer.Option(help="model dtype: float32, bfloat16, float16, float64")]
Layers = Annotated[str | None, typer.Option(
    help="residual positions to pool, e.g. '0,4,8' (0 = embeddings, l = output of layer l; "
    "default: all)")]
PerLayer = Annotated[bool, typer.Option(
    help="keep every position's statistics even beyond the 2 GiB in-memory budget (otherwise "
    "evenly spaced positions), and (match) report how each position's own gauge agrees with "
    "the combined one")]
Seed = Annotated[int, typer.Option(callback=_range(0), help="seed of the synthetic token stream")]
MethodOpt = Annotated[str, typer.Option(help="signmarg (default), signed, or perm")]
SourceOpt = Annotated[str, typer.Option(
    help="both (default: activations at every residual position and weight signatures, each "
    "weighed by how clearly it singles out partners), activations, weights (data-free), or "
    "pooled (the seed paper's estimator: co-moments pooled over positions, one matrix)")]
MinConfidence = Annotated[float | None, typer.Option(
    callback=_range(0), help="coordinates whose confidence (matched score minus the best "
    "alternative, in standard deviations of the score) is below this are flagged [default: "
    "1.5, which flagged every wrong coordinate on benchmarks/bench_lineages.py]")]
Strict = Annotated[bool, typer.Option(
    help="exit 1 when any coordinate is flagged (the gauge file is still written, with every "
    "coordinate's confidence)")]


SolverOpt = Annotated[str, typer.Option(help="assignment solver: lapjvs (lapx) or scipy")]
MaxMemory = Annotated[str | None, typer.Option(
    "--max-memory", help="run within this much memory (e.g. 200MB, 4GB): both models layer by "
    "layer, weights read from disk as needed (CPU)")]
DeviceMap = Annotated[str | None, typer.Option(
    "--device-map", help="'auto': spread each model over the GPUs (and CPU) with accelerate")]


def _stats_options(tokens_from: str | None, n_tokens: int, seq_len: int, batch_size: int,
                   device: str, dtype: str, layers: str | None, per_layer: bool, seed: int,
                   max_memory: str | None = None, device_map: str | None = None):
    from .estimate import StatsOptions
    from .layerwise import parse_size

    positions = None
    if layers is not None:
        try:
            positions = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise GaugefixError(f"--layers must be comma-separated integers, got {layers!r}"
                                ) from None
    return StatsOptions(tokens=tokens_from, n_tokens=n_tokens, seq_len=seq_len,
                        batch_size=batch_size, device=device, dtype=dtype, positions=positions,
                        per_position=per_layer, seed=seed, progress=True,
                        max_memory=None if max_memory is None else parse_size(max_memory),
                        device_map=device_map)


def _listed(items: list[int], n: int = 20) -> str:
    return ", ".join(map(str, items[:n])) + (" ..." if len(items) > n else "")


def _strict_verdict(confidence: Any, threshold: float, strict: bool) -> None:
    """With --strict, flagged coordinates are the command's verdict: one line, exit 1."""
    low = [i for i, c in enumerate(confidence) if c < threshold]
    if strict and low:
        err.print(f"strict: {len(low)} of {len(confidence)} coordinates below confidence "
                  f"{threshold:g} ({_listed(low)})", soft_wrap=True, markup=False)
        raise typer.Exit(1)


def _print_match(result: Any, title: str, threshold: float) -> None:
    summ = result.summary(threshold)
    out.print(f"{title}: mean matched |corr| {summ['mean_abs_corr']:.3f}, confidence min "
              f"{summ['min_confidence']:.3f} / median {summ['median_confidence']:.3f}; "
              f"{summ['n_low_confidence']} of {result.gauge.d} coordinates below "
              f"{summ['low_confidence_threshold']}")
    low = result.low_confidence(threshold)
    if low:
        err.print(f"[yellow]low-confidence B coordinates:[/] {_listed(low)}", soft_wrap=True)


@command(inputs=("model_a", "model_b", "tokens_from"), outputs=("output",))
def stats(
    model_a: Annotated[str, typer.Argument(help="checkpoint A")],
    model_b: Annotated[str, typer.Argument(help="checkpoint B")],
    output: Annotated[Path, typer.Option("-o", "--output", help="statistics file "
                      "(.safetensors)")],
    tokens_from: TokensFrom = None, tokens: NTokens = 16384, seq_len: SeqLen = 128,
    batch_size: BatchSize = 8, device: Device = "cpu", dtype: DType = "float32",
    layers: Layers = None, per_layer: PerLayer = False, seed: Seed = 0,
    max_memory: MaxMemory = None, device_map: DeviceMap = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Accumulate cross-statistics of two residual streams (shards add up: match --stats)."""
    from .estimate import activation_stats, check_pair, evidence_options

    _, d = check_pair(model_a, model_b)
    # every position kept one by one, as match weighs them (up to the in-memory budget)
    opts = evidence_options(model_a, d, _stats_options(
        tokens_from, tokens, seq_len, batch_size, device, dtype, layers, per_layer, seed,
        max_memory, device_map))
    st = activation_stats(model_a, model_b, opts)
    st.save(output, overwrite=overwrite)
    written(f"statistics of {st.n_tokens} tokens × {len(st.positions)} positions "
            f"(d={st.d}) → {output}")


@command(inputs=("model_a", "model_b", "stats_files", "tokens_from"), outputs=("output",))
def match(
    model_a: Annotated[str, typer.Argument(help="checkpoint in chart A")],
    model_b: Annotated[str, typer.Argument(help="checkpoint in chart B")],
    output: Annotated[Path, typer.Option("-o", "--output", help="gauge file to write")],
    method: MethodOpt = "signmarg", source: SourceOpt = "both",
    stats_files: Annotated[list[Path] | None, typer.Option(
        "--stats", help="saved statistics to use instead of a forward pass; several shards "
        "are added")] = None,
    tokens_from: TokensFrom = None, tokens: NTokens = 16384, seq_len: SeqLen = 128,
    batch_size: BatchSize = 8, device: Device = "cpu", dtype: DType = "float32",
    layers: Layers = None, per_layer: PerLayer = False, seed: Seed = 0,
    solver: SolverOpt = "lapjvs", max_memory: MaxMemory = None, device_map: DeviceMap = None,
    gain_weight: Annotated[float, typer.Option(
        callback=_range(0, 1), help="weights source: blend of the unsigned "
        "gain-fingerprint similarity into the sign-blind score")] = 0.0,
    features: Annotated[int, typer.Option(
        callback=_range(0), help="weights source: signature entries sampled over all "
        "residual tensors (0: every entry of every tensor, slow at real widths)")] = 8192,
    min_confidence: MinConfidence = None, strict: Strict = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Estimate the gauge A → B (sign-marginalised Hungarian matching)."""
    from .estimate import (
        activation_stats,
        check_choices,
        check_pair,
        evidence_options,
        gauge_metadata,
        match_stats,
        match_weights,
        weight_evidence,
    )
    from .match import match_correlation
    from .stats import CrossStats, sum_stats

    check_choices(method, source, solver)
    fam, d = check_pair(model_a, model_b)
    extra: dict[str, Any] = {}
    if source == "weights":
        if stats_files:
            raise GaugefixError("--stats goes with --source both, activations or pooled")
        result = match_weights(model_a, model_b, method, gain_weight=gain_weight, solver=solver,
                               features=features or None)
    else:
        if stats_files:
            st = sum_stats(CrossStats.load(p) for p in stats_files)
        else:
            st = activation_stats(model_a, model_b, evidence_options(model_a, d, _stats_options(
                tokens_from, tokens, seq_len, batch_size, device, dtype, layers, per_layer,
                seed, max_memory, device_map)))
        if st.d != d:
            raise GaugefixError(f"width mismatch: statistics have d={st.d}, the models d={d}")
        weights = weight_evidence(model_a, model_b, features=features or None) \
            if source == "both" else None
        result = match_correlation(st.pooled.correlation(), method, global_sign_only=not
                                   fam.allows_signs, solver=solver) if source == "pooled" \
            else match_stats(st, fam, method, solver, weights)
        extra = {"n_tokens": st.n_tokens, "positions": st.positions}
        if per_layer and st.per_position:
            t = Table(title="per-position agreement with the combined gauge")
            t.add_column("position")
            t.add_column("full agreement", justify="right")
            t.add_column("mean |corr|", justify="right")
            agree = {}
            for p, m in sorted(st.per_position.items()):
                r = match_correlation(m.correlation(), method,
                                      global_sign_only=not fam.allows_signs, solver=solver)
                agree[p] = r.gauge.compare(result.gauge)["full_accuracy"]
                t.add_row(str(p), f"{agree[p]:.3f}", f"{r.mean_abs_corr:.3f}")
            out.print(t)
            extra["per_position_agreement"] = {str(k): v for k, v in agree.items()}
    threshold = result.threshold if min_confidence is None else min_confidence
    meta = gauge_metadata(result, model_a, model_b, source=source, extra=extra,
                          threshold=threshold)
    result.gauge.save(output, meta, overwrite=overwrite)
    _print_match(result, f"{method} ({source})", threshold)
    written(f"gauge written to {output}")
    _strict_verdict(result.confidence, threshold, strict)


@command(inputs=("checkpoints", "tokens_from"), outputs=("output",))
def trajectory(
    checkpoints: Annotated[list[str], typer.Argument(help="CKPT_0 CKPT_1 ... CKPT_n")],
    output: Annotated[Path, typer.Option("-o", "--output", help="gauge CKPT_0 → CKPT_n")],
    method: MethodOpt = "signmarg", source: SourceOpt = "both",
    tokens_from: TokensFrom = None, tokens: NTokens = 16384, seq_len: SeqLen = 128,
    batch_size: BatchSize = 8, device: Device = "cpu", dtype: DType = "float32",
    layers: Layers = None, seed: Seed = 0, solver: SolverOpt = "lapjvs",
    max_memory: MaxMemory = None, device_map: DeviceMap = None,
    bridge: Annotated[bool, typer.Option(
        help="around a step with flagged coordinates, also match over it (i-1 → i+1, i → i+2, "
        "i-1 → i+2) and compose along the path whose weakest step is strongest")] = True,
    min_confidence: MinConfidence = None, strict: Strict = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the per-step table as JSON")
                       ] = False,
) -> None:
    """Match consecutive checkpoints (bridging weak steps) and compose the local gauges
    (CKPT_0's chart → CKPT_n's)."""
    from .estimate import gauge_metadata
    from .estimate import trajectory as run_trajectory

    opts = _stats_options(tokens_from, tokens, seq_len, batch_size, device, dtype, layers,
                          False, seed, max_memory, device_map)
    opts.progress = False
    res = run_trajectory(checkpoints, source=source, method=method, opts=opts, solver=solver,
                         bridge=bridge)
    min_confidence = res.threshold if min_confidence is None else min_confidence
    table = res.step_table(min_confidence)
    conf = res.confidence()
    bridges = [{"from": i, "to": j, "n_low_confidence": n} for (i, j), n in res.bridges.items()]
    meta = gauge_metadata(res.steps[0], checkpoints[0], checkpoints[-1], source=source,
                          extra={"steps": table, "composed_from": len(res.steps),
                                 "path": res.path, "bridges": bridges})
    meta["confidence"] = [round(float(c), 6) for c in conf]
    meta["summary"] = {"min_step_confidence": float(conf.min()),
                       "n_low_confidence": int((conf < min_confidence).sum()),
                       "low_confidence_threshold": min_confidence}
    res.gauge.save(output, meta, overwrite=overwrite)
    if as_json:
        _print_json(table)
    else:
        t = Table(title=f"{len(res.steps)} local gauges ({method}, {source})")
        for col in ("step", "from → to", "mean |corr|", "min conf.", "median conf.", "low"):
            t.add_column(col, justify="right" if col != "from → to" else "left")
        for k, row in enumerate(table):
            style = "bold yellow" if k == res.weakest_step else None
            t.add_row(str(k), f"{row['from']} → {row['to']}", f"{row['mean_abs_corr']:.3f}",
                      f"{row['min_confidence']:.3f}", f"{row['median_confidence']:.3f}",
                      str(row["n_low_confidence"]), style=style)
        out.print(t)
        out.print(f"weakest step: {res.weakest_step}")
        if res.bridges:
            skipped = sorted(set(range(len(checkpoints))) - set(res.path))
            out.print(f"path: {' → '.join(map(str, res.path))} (bridges tried: "
                      + ", ".join(f"{i}→{j}: {n} flagged" for (i, j), n in res.bridges.items())
                      + (f"; skipped {', '.join(map(str, skipped))})" if skipped else ")"),
                      soft_wrap=True)
        written(f"composed gauge written to {output}")
    _strict_verdict(conf, min_confidence, strict)


# ---------------------------------------------------------------------------- algebra
@command(inputs=("gauges",), outputs=("output",))
def compose(
    gauges: Annotated[list[Path], typer.Argument(help="G1 G2 ... (apply G1 first)")],
    output: Annotated[Path, typer.Option("-o", "--output")],
    force: Annotated[bool, typer.Option(help="compose even when the gauge files' recorded "
                                        "charts do not chain")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Compose gauges: apply G1, then G2, ... (charts must chain)."""
    from .estimate import compose_documents

    total, meta = compose_documents(gauges, force=force)
    total.save(output, meta, overwrite=overwrite)
    written(f"composed {len(gauges)} gauges (d={total.d}) → {output}")


@command(inputs=("gauge",), outputs=("output",))
def invert(
    gauge: Annotated[Path, typer.Argument(help="gauge A → B")],
    output: Annotated[Path, typer.Option("-o", "--output", help="gauge B → A")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Invert a gauge (B → A)."""
    from .group import SignedPerm, read_gauge_document

    doc = read_gauge_document(gauge)
    meta: dict[str, Any] = {"method": "invert", "inverted_from": str(gauge)}
    if "source" in doc and "target" in doc:
        meta.update(source=doc["target"], target=doc["source"])
    SignedPerm.from_json(doc).inverse().save(output, meta, overwrite=overwrite)
    written(f"inverse written to {output}")


@command(inputs=("estimate", "reference"))
def compare(
    estimate: Annotated[Path, typer.Argument(help="estimated gauge")],
    reference: Annotated[Path, typer.Argument(help="reference gauge")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Permutation, sign and full accuracy of an estimated gauge against a reference."""
    from .group import SignedPerm

    c = SignedPerm.load(estimate).compare(SignedPerm.load(reference))
    if as_json:
        _print_json(c)
    else:
        out.print(f"d={c['d']}: permutation accuracy {c['perm_accuracy']:.4f}, sign accuracy "
                  f"(on matched) {c['sign_accuracy']:.4f}, full accuracy "
                  f"{c['full_accuracy']:.4f}")


# ---------------------------------------------------------------------------- transport
@command(inputs=("source", "gauge", "model", "checkpoint"), outputs=("output",))
def transport(
    kind: Annotated[str, typer.Argument(help=kinds_help())],
    source: Annotated[Path, typer.Argument(help="the object, in chart A (B with --inverse)")],
    gauge: Annotated[list[str], typer.Option(help="gauge A → B; a per-slot kind takes one "
                     "per slot, in order ('-' leaves a slot unchanged)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the moved "
                      "object (same format as the input)")],
    inverse: Annotated[bool, typer.Option(help="move from B back to A")] = False,
    model: Annotated[Path | None, typer.Option(help="lora: the base checkpoint (for its "
                     "family); optim: the checkpoint a bare optimizer.pt belongs to")] = None,
    family: Annotated[str | None, typer.Option(help="lora: the base model's family")] = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="the checkpoint the moved object belongs to: recorded with its gauge-invariant "
        "fingerprint")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Move a coordinate-indexed object (steering vector, SAE, transcoder, crosscoder, neuron
    list, LoRA adapter, optimizer state, ...) to chart B, in its own format."""
    from .group import SignedPerm
    from .transport import transport as run

    options: dict[str, Any] = {k: v for k, v in (("model", model), ("family", family))
                               if v is not None}
    check_options(transport_kind(kind), options)
    gauges = [None if g == "-" else SignedPerm.load(Path(g)) for g in gauge]
    g: Any = gauges[0] if len(gauges) == 1 and gauges[0] is not None else gauges
    if checkpoint is not None:
        from .canonical import fingerprint as fp

        options["checkpoint"] = {"name": checkpoint,
                                 "fingerprint": fp(checkpoint, discrete_only=True).fingerprint}
    info = run(kind, source, output, g, inverse=inverse, overwrite=overwrite,
               gauge_file=", ".join(gauge), **options)
    detail = ", ".join(f"{k} {v}" for k, v in info.items())
    written(f"{kind}: {detail} → {output} ({'B → A' if inverse else 'A → B'})")


@command(inputs=("model_a", "model_b", "gauge", "base"), outputs=("output", "export_aligned"))
def merge(
    model_a: Annotated[str, typer.Argument(help="checkpoint A (the merge is in A's chart)")],
    model_b: Annotated[str, typer.Argument(help="checkpoint B")],
    output: Annotated[Path, typer.Option("-o", "--output", help="merged checkpoint")],
    gauge: Annotated[Path | None, typer.Option(help="gauge A → B (B is moved by its "
                     "inverse); omit only with --unaligned")] = None,
    method: Annotated[str, typer.Option(help=methods_help())] = "linear",
    weight: Annotated[float, typer.Option(callback=_range(), help=f"weight of B "
                                          f"({weight_help()})")] = 0.5,
    base: Annotated[Path | None, typer.Option(help="task-arithmetic: the common base, in "
                    "A's chart")] = None,
    export_aligned: Annotated[Path | None, typer.Option(help="also write B in A's chart "
                              "here (for mergekit)")] = None,
    unaligned: Annotated[bool, typer.Option(help="merge without any alignment (a baseline)")
                         ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace existing outputs")] = False,
) -> None:
    """Coordinate-preserving merge: put B into A's chart, then merge."""
    from .group import SignedPerm
    from .transport import merge_checkpoints

    if (gauge is None) != unaligned:
        raise GaugefixError("give --gauge G.json, or --unaligned for the unaligned baseline")
    g = SignedPerm.load(gauge) if gauge is not None else None
    info = merge_checkpoints(model_a, model_b, g, output, method=method, weight=weight,
                             base=base, export_aligned=export_aligned, overwrite=overwrite,
                             progress=True)
    written(f"merged {info['tensors']} tensors ({method}, w={weight}, "
            f"{'aligned' if info['aligned'] else 'UNALIGNED'}) → {output}")


# ---------------------------------------------------------------------------- audit
@command(inputs=("claim", "models", "source", "tokens_from"), outputs=("output",))
def audit(
    claim: Annotated[Path, typer.Argument(help="claim file (gaugefix.claim/1 JSON)")],
    models: Annotated[list[str], typer.Argument(help="checkpoints to audit the claim on")],
    source: Annotated[str | None, typer.Option(help="the claim's source checkpoint (default: "
                      "the claim's 'source' field)")] = None,
    gauges: Annotated[int, typer.Option(callback=_range(0), help="random B_d and S_d "
                                        "re-gaugings per "
                                        "model")] = 4,
    seed: Annotated[int, typer.Option(callback=_range(0), help="seed of the random gauges")] = 0,
    tokens_from: TokensFrom = None, tokens: NTokens = 16384, max_memory: MaxMemory = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write the report "
                      "(JSON) here")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    fingerprints: Annotated[bool, typer.Option(
        help="name every checkpoint in the report by its gauge-invariant fingerprint too "
        "(reads each one whole)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Does an index-level claim reproduce by raw index, or only through the explicit gauge?"""
    import torch

    from .audit import audit_models, check_claim, load_claim
    from .checkpoint import Checkpoint
    from .estimate import StatsOptions, estimate_gauge
    from .group import SignedPerm
    from .io import atomic_write_text
    from .layerwise import open_offloaded, parse_size
    from .stats import load_tokenizer
    from .verify import load_causal_lm

    c = load_claim(claim)
    src = source or c.source
    if src is None:
        raise GaugefixError("the claim names no source checkpoint; pass --source")
    src_ckpt = Checkpoint.open(src)
    ckpts = [Checkpoint.open(m) for m in models]
    for ck in (src_ckpt, *ckpts):  # everything refused before any model is loaded
        check_claim(c, name=str(ck.path), n_layers=ck.n_layers, d=ck.hidden_size,
                    vocab_size=ck.vocab_size)
        if ck.family.name != src_ckpt.family.name or ck.hidden_size != src_ckpt.hidden_size:
            raise GaugefixError(f"{ck.path} ({ck.family.name}, d={ck.hidden_size}) cannot be "
                                f"compared with the source {src} ({src_ckpt.family.name}, "
                                f"d={src_ckpt.hidden_size})")
    tokenizer = None
    if any(isinstance(p, str) for p in (c.positive or []) + (c.negative or [])):
        tokenizer = load_tokenizer(src_ckpt.path, why="the claim has text prompts")
    budget = None if max_memory is None else parse_size(max_memory)
    opts = StatsOptions(tokens=tokens_from, n_tokens=tokens, seed=seed, max_memory=budget)
    with tempfile.TemporaryDirectory(prefix="gaugefix-offload-") as off:

        def load(ck: Any) -> Any:  # whole, or every decoder layer left on disk
            if budget is None:
                return load_causal_lm(ck.path, torch.float32)
            return open_offloaded(ck, torch.float32, Path(off) / str(len(os.listdir(off)))
                                  ).model

        source_model = load(src_ckpt)
        triples = []
        for m, ck in zip(models, ckpts, strict=True):
            model = load(ck)
            same = ck.path.resolve() == src_ckpt.path.resolve()
            est = SignedPerm.identity(ck.hidden_size) if same else estimate_gauge(
                src, m, opts=opts, _models=None if budget else (source_model, model)).gauge
            triples.append((m, model, est))
        rep = audit_models(c, triples, n_gauges=gauges, seed=seed, tokenizer=tokenizer)
    doc = {**rep.to_dict(), "summary": rep.summary(), "claim": str(claim), "source": src}
    if fingerprints:
        from .canonical import fingerprint as fp

        doc["fingerprints"] = {m: fp(m, discrete_only=True).fingerprint
                               for m in dict.fromkeys([src, *models])}
    if output is not None:
        atomic_write_text(output, json.dumps(doc, indent=2) + "\n", overwrite=overwrite)
    if as_json:
        _print_json(doc)
        return
    t = Table(title=f"audit of {claim.name}: top-{rep.claim_k} coordinates at position "
              f"{rep.layer}")
    for col in ("model", "gauge", "raw index", "through gauge"):
        t.add_column(col, justify="left" if col in ("model", "gauge") else "right")
    for r in rep.rows:
        t.add_row(r.model, r.gauge, f"{r.raw:.0%}", f"{r.transported:.0%}")
    out.print(t)
    for kind, v in rep.summary().items():
        out.print(f"{kind}: reproduces {v['raw']:.0%} by raw index, {v['transported']:.0%} "
                  "through the explicit gauge")


# ---------------------------------------------------------------------------- demo
@command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="output directory (report.md, "
                       "results.json, plots; trained models are cached in DIR/cache)")
                       ] = Path("gaugefix-demo"),
    quick: Annotated[bool, typer.Option(help="a smaller, faster version (used by the tests)")
                     ] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    seed: Annotated[int, typer.Option(callback=_range(0), help="random seed")] = 0,
    seeds: Annotated[int, typer.Option(
        callback=_range(1), help="repeat the run-dependent headline figures on this many "
        "training runs (seeds SEED, SEED+1, ...) and report each as mean and range")] = 1,
) -> None:
    """Reproduce the seed paper's headline results on tiny models trained here."""
    from .demo import DemoConfig, run_demo

    if device not in ("cpu", "cuda"):
        raise GaugefixError(f"unknown device {device!r}; choose cpu or cuda")
    run_demo(out_dir, DemoConfig(quick=quick, seed=seed, seeds=seeds, device=device),
             console=out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
