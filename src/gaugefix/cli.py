"""Command-line interface: parse, one library call (:mod:`gaugefix.jobs`), print.

Every user error is a :class:`GaugefixError` (or a usage error, or an OSError),
printed as one line (``error: ...``) with exit status 2; a failed check
(``verify``) exits 1; SIGINT, SIGTERM and SIGHUP remove every partial output and
exit 128 + the signal number (after the outputs were published, they stay, and the
message says so). Text that comes from the user or a file is printed literally: the
consoles interpret no markup, and gaugefix's own styling is built from ``Text`` parts.
"""

from __future__ import annotations

import contextlib
import functools
import inspect as _inspect
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

try:  # typer vendors click from 0.2x on; before, it used click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import ClickException, NoArgsIsHelpError

from .errors import GaugefixError, GaugefixWarning
from .registry import (
    base_help,
    check_options,
    kinds_help,
    methods_help,
    option_help,
    transport_kind,
    weight_help,
)


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
# no markup, no emoji codes: a path or a tensor name holding "[/]" or ":x:" prints as it is
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

F = TypeVar("F", bound=Callable[..., Any])
# upper bounds of counts: seeds as numpy and torch take them; tokens as one id array holds them
# (shards of statistics add up: `stats` per shard, then `match --stats`)
MAX_SEED = 2**32 - 1
MAX_TOKENS = 1 << 27
MAX_SEQ_LEN = 1 << 20
MAX_BATCH = 1 << 16


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _labelled(label: str, style: str, message: object, *, one_line: bool = True) -> None:
    """``label: message`` on stderr, the label styled, the message literal."""
    text = _one_line(message) if one_line else str(message)
    err.print(Text.assemble((label, style), " ", text), soft_wrap=True)


def _error_line(message: object) -> None:
    _labelled("error:", "bold red", message)


def _warn_line(message: object) -> None:
    _labelled("warning:", "bold yellow", message)


def _note_line(message: object) -> None:
    _labelled("note:", "bold yellow", message)


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    _warn_line(message)


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
            # as the console script, the process ends with this command: a signal from here
            # on (Python's own exit included) says what the command left, and exits
            signal.signal(n, _late_signal if _process["console"] else h)


# the console script's process: set by :func:`main`; what the last command left
_process: dict[str, Any] = {"console": False, "published": False, "named": [], "writes": False}


def _late_signal(signum: int, frame: Any) -> None:
    """A signal after the command's handlers are gone (it finished, or it is exiting): the
    line the command's own handler would print, from what the disk holds, and 128+signum,
    every time (a KeyboardInterrupt here would surface wherever Python happens to be: in
    click's exit, or in the interpreter's shutdown, where it prints a traceback and exits
    0)."""
    for n in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
        signal.signal(n, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    _interrupted_line(signum, _process["published"], _process["named"], _process["writes"])
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def _quiet_unless_main_rank() -> Iterator[None]:
    """Under torchrun every rank computes the same result: rank 0 alone reports it."""
    from .distributed import is_main_rank

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
    """Register a command. ``inputs``/``outputs`` name its path parameters (a name that is not
    a parameter fails here, at import): outputs are checked (existence, overlap with any
    input) before any work, and everything the command writes is published together when it
    succeeds, or not at all. A GaugefixError or an OSError becomes one ``error:`` line and
    exit 2; a signal, one line and 128+signum, saying whether the outputs were published."""

    def register(fn: F) -> F:
        params = set(_inspect.signature(fn).parameters)
        unknown = [n for n in (*inputs, *outputs) if n not in params]
        if unknown:
            raise TypeError(f"command {fn.__name__}: {', '.join(unknown)} declared as inputs "
                            f"or outputs but not among its parameters ({', '.join(params)})")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            code = _invoke(fn, args, kwargs, inputs, outputs)
            if code:
                raise typer.Exit(code)

        app.command()(wrapper)
        return fn

    return register


@contextlib.contextmanager
def _published(inputs: tuple[str, ...], outputs: tuple[str, ...], kwargs: dict[str, Any]
               ) -> Iterator[list[Path]]:
    """The command's outputs, refused before any work where they exist or overlap an input,
    and published together when the block ends (commands without outputs, the demo, write
    their work products as they go, each one atomically)."""
    from .distributed import barrier
    from .io import transaction

    if not outputs:
        yield []
        return
    with transaction([p for n in inputs for p in _existing_paths(kwargs.get(n))]) as tx:
        named = [Path(kwargs[n]) for n in outputs if kwargs.get(n) is not None]
        for k, path in enumerate(named):
            tx.check(path, bool(kwargs.get("overwrite")), named[:k])
        yield named
        barrier()  # under torchrun: publish only if every rank got here


def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
            inputs: tuple[str, ...], outputs: tuple[str, ...]) -> int:
    """Run one command; its exit status (see :func:`command`)."""
    from .distributed import is_main_rank

    code = 0
    named: list[Path] = []
    published = False
    try:
        with _signals_unwind(), warnings.catch_warnings():
            warnings.simplefilter("always", GaugefixWarning)
            warnings.showwarning = _show_warning
            _quiet_libraries()
            with _published(inputs, outputs, kwargs) as named:
                try:
                    with _quiet_unless_main_rank():
                        fn(*args, **kwargs)
                except typer.Exit as exc:  # the command's own verdict
                    code = exc.exit_code
            published = bool(outputs)
            _process.update(published=published, named=list(named), writes=bool(outputs))
            if is_main_rank():
                for line in _after_commit.get():
                    (err if _json_printed.get() else out).print(line)
    except GaugefixError as exc:
        _error_line(exc)
        return 2
    except Interrupted as exc:
        _interrupted_line(exc.signum, published, named, bool(outputs))
        return 128 + exc.signum
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _error_line(f"{where}{exc.strerror or exc}")
        return 2
    finally:
        _after_commit.set(())
        _json_printed.set(False)
    return code


def _interrupted_line(signum: int, published: bool, named: list[Path], writes: bool) -> None:
    """What a signal left, read from the disk: the outputs, complete, or nothing."""
    name = signal.Signals(signum).name
    if published and all(os.path.lexists(p) for p in named):
        _error_line(f"interrupted by {name} after the outputs were written; they are "
                    f"complete: {', '.join(map(str, named))}")
    else:
        cleaned = "; nothing was written (temporary outputs removed)" if writes else ""
        _error_line(f"interrupted by {name}{cleaned}")


_after_commit: ContextVar[tuple[str, ...]] = ContextVar("gaugefix_after_commit", default=())
# once a command printed JSON on stdout, its other lines go to stderr (stdout stays parseable)
_json_printed: ContextVar[bool] = ContextVar("gaugefix_json_printed", default=False)


def written(line: str) -> None:
    """Say what was written, once it really is (after the outputs are published)."""
    _after_commit.set((*_after_commit.get(), line))


def _print_json(obj: Any) -> None:
    """JSON on stdout; a value that is not a finite number (NaN weights) is written as null,
    with a warning, since JSON has no NaN."""
    from .io import has_non_finite, json_safe

    if has_non_finite(obj):
        _warn_line("some values are not finite numbers (NaN or infinite weights?); they are "
                   "written as null")
    sys.stdout.write(json.dumps(json_safe(obj), indent=2) + "\n")
    _json_printed.set(True)


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
    from . import jobs

    rep = jobs.inspect(model)
    if as_json:
        _print_json(rep.to_dict())
        return
    t = Table(show_header=False, box=None)
    t.add_row("family", f"{rep.family} (model_type {rep.model_type})")
    t.add_row("norm", rep.norm_description)
    t.add_row("hidden size d", str(rep.hidden_size))
    if rep.quantised:
        t.add_row("quantised", ", ".join(f"{k} ×{n}" for k, n in sorted(rep.quantised.items()))
                  + " (writer rows move exactly; readers' blocks exactly when a gauge keeps "
                  "them whole, else requantised)")
    if rep.gains_all_one:
        t.add_row("gauge group", f"O({rep.hidden_size}): every gain is equal, so rotations are "
                  f"symmetries too ({rep.gauge_group} among signed permutations)")
    else:
        t.add_row("gauge group", f"{rep.gauge_group} (among signed permutations, generic "
                  "gains)")
    t.add_row("tied embeddings", str(rep.tied_embeddings))
    t.add_row("norm vectors", f"{rep.n_norm_vectors} (fingerprint d×{rep.n_norm_vectors})")
    t.add_row("tied coordinates", f"{rep.n_tied_coordinates} in {len(rep.tie_groups)} groups")
    if rep.min_separation is not None:
        t.add_row("closest pair", f"{rep.closest_pair} at max|Δ| = {rep.min_separation:.3g}")
    out.print(t)
    for w in rep.warnings:
        _warn_line(w)


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
    from . import jobs

    chart = jobs.canonicalize(model, output, overwrite=overwrite, discrete_only=discrete_only)
    if as_json:
        _print_json(chart.to_dict())
    for line in chart.describe():
        _note_line(line)
    written(f"canonical chart written to {output}")


@command(inputs=("model",), outputs=("record",))
def fingerprint(
    model: Annotated[str, typer.Argument(help="checkpoint directory or hub id")],
    discrete_only: DiscreteOnly = False,
    record: Annotated[Path | None, typer.Option(
        help="also write the fingerprint record (a small safetensors file) that `identify "
        "--against` tests suspects against")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing record")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """A gauge-invariant identifier: equal for re-gauged copies, changed by any weight."""
    from . import jobs

    fp = jobs.fingerprint(model, discrete_only=discrete_only, record=record,
                          overwrite=overwrite)
    if record is not None:
        written(f"fingerprint record written to {record}")
    if as_json:
        _print_json(fp.to_dict())
        return
    out.print(fp.fingerprint)
    for line in fp.chart.describe():
        _note_line(line)


@command(inputs=("model_a", "model_b", "against"))
def identify(
    model_a: Annotated[str, typer.Argument(help="checkpoint A (with --against: the suspect)")],
    model_b: Annotated[str | None, typer.Argument(help="checkpoint B")] = None,
    against: Annotated[Path | None, typer.Option(
        help="a folder of fingerprint records (`fingerprint --record`): test MODEL_A "
        "against each")] = None,
    alpha: Annotated[float | None, typer.Option(
        "--alpha", help="derived when the held-out test's p-value is at most this (the "
        "false-positive rate per unrelated pair); default 1e-6")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Same function up to gauge, derived (e.g. fine-tuned), or unrelated: from weights alone."""
    from . import jobs

    if (model_b is None) == (against is None):
        raise GaugefixError("identify takes either MODEL_B or --against DIR (one of them)")
    if against is not None:
        results = jobs.identify_against(model_a, against, alpha=alpha)
        if as_json:
            _print_json({"suspect": model_a, "results": [r.to_dict() for r in results]})
            return
        for r in results:
            out.print(f"{r.identity.verdict:9} {r.reference}: {r.identity.reason} "
                      f"[{r.seconds:.2f} s]")
        return
    r = jobs.identify(model_a, model_b, alpha=alpha)
    if as_json:
        _print_json(r.to_dict())
        return
    out.print(f"{r.verdict}: {r.reason}")


# ---------------------------------------------------------------------------- apply
@command(inputs=("model", "gauge"), outputs=("output", "gauge_out"))
def apply(
    model: Annotated[str, typer.Argument(help="model in chart A: a checkpoint directory, a "
                                         "GGUF file or a hub id")],
    output: Annotated[Path, typer.Argument(help="where the model in chart B goes: a directory, "
                                           "or a .gguf file for a GGUF model")],
    gauge: Annotated[Path | None, typer.Option(help="gauge file to apply")] = None,
    random: Annotated[int | None, typer.Option("--random", callback=_range(0, MAX_SEED),
                      help="apply a random gauge drawn with this seed (B_d for RMSNorm, "
                      "S_d×{±1} for LayerNorm)")] = None,
    kind: Annotated[str | None, typer.Option(help="random gauge kind: signed, perm or "
                    "global (default: the family's full group)")] = None,
    positive_fraction: Annotated[float | None, typer.Option(
        callback=_range(0, 1), help="random signed gauge: fraction of +1 signs")] = None,
    gauge_out: Annotated[Path | None, typer.Option(help="write the applied gauge here")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing outputs")] = False,
) -> None:
    """Write MODEL in another gauge: same function, weights gathered and sign-flipped."""
    from . import jobs

    res = jobs.apply(model, output, gauge, random=random, kind=kind,
                     positive_fraction=positive_fraction, gauge_out=gauge_out,
                     overwrite=overwrite)
    rep = res.report
    written(
        f"{rep.family}: d={rep.d}, {rep.n_transformed}/{rep.n_tensors} tensors transformed "
        f"({', '.join(f'{k}×{n}' for k, n in sorted(rep.ops.items()))}) in {rep.shards} "
        f"shard(s), {rep.bytes_written / 1e6:.1f} MB → {output}"
    )
    if rep.n_tower:
        written(f"{rep.n_tower} tensors of the vision/audio tower(s) left as they are (they "
                "never touch the text model's residual stream)")
    if rep.requantised:
        written(_requantised_line(rep.requantised))
    if gauge_out is not None:
        written(f"gauge written to {gauge_out}")


def _requantised_line(rows: list[dict[str, Any]]) -> str:
    """What a move that was not exact in the format cost (rows: TensorMove.to_dict)."""
    errors = sorted(r["error"] for r in rows)
    types = sorted({r["type"] for r in rows})
    trips = [r["round_trip"] for r in rows if "round_trip" in r]
    trip = f" (a plain round trip of the unmoved tensors: up to {max(trips):.2g})" \
        if trips else ""
    return (f"not exact: {len(rows)} quantised tensors ({', '.join(types)}) have blocks along "
            f"the residual axis that this gauge splits; they were requantised with the "
            f"format's reference quantiser, relative error median {errors[len(errors) // 2]:.2g}"
            f", max {errors[-1]:.2g}{trip}; the output records them (gaugefix.record). A gauge "
            "that keeps the blocks whole moves them exactly")


# ---------------------------------------------------------------------------- verify
@command(inputs=("model_a", "model_b", "gauge"))
def verify(
    model_a: Annotated[str, typer.Argument(help="checkpoint in chart A")],
    model_b: Annotated[str, typer.Argument(help="checkpoint in chart B")],
    gauge: Annotated[Path, typer.Option(help="gauge A → B")],
    tokens: Annotated[int, typer.Option(callback=_range(1, 1 << 20),
                                        help="number of probe tokens")] = 256,
    tol: Annotated[float | None, typer.Option(
        callback=_range(0), help="maximum relative error [default: from the dtype: 1e-10 "
        "float64, 1e-4 float32, 2e-2 float16, 0.15 bfloat16]")] = None,
    dtype: Annotated[str, typer.Option(help="float32, float64, bfloat16, float16")] = "float32",
    seed: Annotated[int, typer.Option(callback=_range(0, MAX_SEED),
                                      help="probe-token seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check that MODEL_B computes MODEL_A's function in chart B (logits, all hidden states)."""
    from . import jobs

    rep = jobs.verify(model_a, model_b, gauge, n_tokens=tokens, tol=tol, dtype=dtype,
                      seed=seed)
    if as_json:
        _print_json(rep.to_dict())
    else:
        _print_verify(rep, dtype, tol_given=tol is not None)
    if not rep.passed:
        raise typer.Exit(1)


def _print_verify(rep: Any, dtype: str, *, tol_given: bool) -> None:
    """The forward comparison (or why it did not run), each tensor's verdict for a quantised
    pair, and the verdict line."""
    if rep.forward is not None:  # a quantised format transformers cannot run here
        out.print(rep.forward)
    else:
        t = Table(title=f"max relative error on {rep.n_tokens} probe tokens ({dtype})")
        t.add_column("output")
        t.add_column("rel. err", justify="right")
        t.add_row("logits", f"{rep.logits_rel_err:.2e}")
        for i, e in enumerate(rep.hidden_rel_err):
            t.add_row(f"hidden_states[{i}]", f"{e:.2e}")
        out.print(t)
    if rep.tensors is not None:
        exact = sum(r["how"] == "exact" for r in rep.tensors)
        out.print(f"tensors: {exact} exact (B's values are A's moved, bit for bit), "
                  f"{rep.requantised} requantised (byte for byte the format's reference "
                  f"quantiser on A's moved values), {len(rep.differs)} differ"
                  + (f" ({', '.join(rep.differs[:4])})" if rep.differs else ""))
        if rep.requantised and rep.forward is None:
            out.print("the requantised tensors change the function by their rounding: the "
                      "errors above are reported, not held to the tolerance")
    verdict = ("PASS", "green") if rep.passed else ("FAIL", "red")
    if rep.forward is not None:
        out.print(Text.assemble(verdict, ": decided by the tensors"))
        return
    if rep.nonfinite:
        out.print(Text.assemble(verdict, ": NaN or Inf in the outputs (" + "; ".join(
            rep.nonfinite[:3]) + (" ..." if len(rep.nonfinite) > 3 else "") + ")"))
        return
    source = "" if tol_given else f", the default for {dtype}"
    out.print(Text.assemble(verdict, f": max {rep.max_rel_err:.2e} (tol {rep.tol:.0e}{source})"))


# ---------------------------------------------------------------------------- estimation
TokensFrom = Annotated[str | None, typer.Option(
    "--tokens-from", help="token source: a text file or directory (tokenised with MODEL_A's "
    "tokenizer), token ids in .npy/.pt, or 'synthetic' (default)")]
NTokens = Annotated[int, typer.Option("--tokens", callback=_range(1, MAX_TOKENS),
                                      help="number of tokens")]
SeqLen = Annotated[int, typer.Option(callback=_range(1, MAX_SEQ_LEN), help="sequence length "
                                     "(at most the model's positions)")]
BatchSize = Annotated[int, typer.Option(callback=_range(1, MAX_BATCH),
                                        help="sequences per forward pass")]
Device = Annotated[str, typer.Option(help="cpu or cuda")]
DType = Annotated[str, typer.Option(help="model dtype: float32, bfloat16, float16, float64")]
Layers = Annotated[str | None, typer.Option(
    help="residual positions to pool, e.g. '0,4,8' (0 = embeddings, l = output of layer l; "
    "default: all)")]
PerLayer = Annotated[bool, typer.Option(
    help="keep every position's statistics even beyond the 2 GiB in-memory budget (otherwise "
    "evenly spaced positions), and (match) report how each position's own gauge agrees with "
    "the combined one")]
Seed = Annotated[int, typer.Option(callback=_range(0, MAX_SEED),
                                   help="seed of the synthetic token stream")]
MethodOpt = Annotated[str, typer.Option(help="signmarg (default), signed, or perm")]
SourceOpt = Annotated[str, typer.Option(
    help="evidence: both (default: activations at every residual position and weight "
    "signatures, each weighed by how clearly it singles out partners), activations, weights "
    "(data-free), or pooled (the seed paper's estimator: co-moments pooled over positions, one "
    "matrix)")]
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


def _stats_options(tokens_from: str | None, n_tokens: int, seq_len: int = 128,
                   batch_size: int = 8, device: str = "cpu", dtype: str = "float32",
                   layers: str | None = None, per_layer: bool = False, seed: int = 0,
                   max_memory: str | None = None, device_map: str | None = None,
                   progress: bool = True) -> Any:
    from . import jobs

    return jobs.stats_options(tokens=tokens_from, n_tokens=n_tokens, seq_len=seq_len,
                              batch_size=batch_size, device=device, dtype=dtype,
                              layers=layers, per_position=per_layer, seed=seed,
                              progress=progress, max_memory=max_memory, device_map=device_map)


def _listed(items: list[int], n: int = 20) -> str:
    return ", ".join(map(str, items[:n])) + (" ..." if len(items) > n else "")


def _strict_verdict(low: list[int], d: int, threshold: float, strict: bool) -> None:
    """With --strict, flagged coordinates are the command's verdict: one line, exit 1."""
    if strict and low:
        err.print(f"strict: {len(low)} of {d} coordinates below confidence {threshold:g} "
                  f"({_listed(low)})", soft_wrap=True)
        raise typer.Exit(1)


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
    from . import jobs

    st = jobs.collect_stats(model_a, model_b, _stats_options(
        tokens_from, tokens, seq_len, batch_size, device, dtype, layers, per_layer, seed,
        max_memory, device_map))
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
        callback=_range(0, 1 << 24), help="weights source: signature entries sampled over "
        "all residual tensors (0: every entry of every tensor, slow at real widths)")] = 8192,
    min_confidence: MinConfidence = None, strict: Strict = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Estimate the gauge A → B (sign-marginalised Hungarian matching)."""
    from . import jobs

    est = jobs.match(model_a, model_b, source=source, method=method, stats=stats_files or None,
                     opts=_stats_options(tokens_from, tokens, seq_len, batch_size, device,
                                         dtype, layers, per_layer, seed, max_memory,
                                         device_map),
                     solver=solver, gain_weight=gain_weight, features=features or None,
                     min_confidence=min_confidence, agreement=per_layer)
    est.save(output, overwrite=overwrite)
    _print_estimate(est, f"{method} ({source})")
    written(f"gauge written to {output}")
    _strict_verdict(est.low_confidence(), est.gauge.d, est.threshold, strict)


def _print_estimate(est: Any, title: str) -> None:
    if est.agreement:
        t = Table(title="per-position agreement with the combined gauge")
        t.add_column("position")
        t.add_column("full agreement", justify="right")
        t.add_column("mean |corr|", justify="right")
        for row in est.agreement:
            t.add_row(str(row["position"]), f"{row['full_agreement']:.3f}",
                      f"{row['mean_abs_corr']:.3f}")
        out.print(t)
    summ = est.summary()
    out.print(f"{title}: mean matched |corr| {summ['mean_abs_corr']:.3f}, confidence min "
              f"{summ['min_confidence']:.3f} / median {summ['median_confidence']:.3f}; "
              f"{summ['n_low_confidence']} of {est.gauge.d} coordinates below "
              f"{summ['low_confidence_threshold']}")
    low = est.low_confidence()
    if low:
        err.print(Text.assemble(("low-confidence B coordinates:", "yellow"),
                                f" {_listed(low)}"), soft_wrap=True)


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
    from . import jobs

    opts = _stats_options(tokens_from, tokens, seq_len, batch_size, device, dtype, layers,
                          False, seed, max_memory, device_map, progress=False)
    est = jobs.trajectory(checkpoints, source=source, method=method, opts=opts, solver=solver,
                          bridge=bridge, min_confidence=min_confidence)
    est.save(output, overwrite=overwrite)
    if as_json:
        _print_json(est.table)
    else:
        _print_trajectory(est, f"({method}, {source})", len(checkpoints))
        written(f"composed gauge written to {output}")
    _strict_verdict(est.low_confidence(), est.gauge.d, est.threshold, strict)


def _print_trajectory(est: Any, how: str, n: int) -> None:
    res = est.result
    t = Table(title=f"{len(res.steps)} local gauges {how}")
    for col in ("step", "from → to", "mean |corr|", "min conf.", "median conf.", "low"):
        t.add_column(col, justify="right" if col != "from → to" else "left")
    for k, row in enumerate(est.table):
        style = "bold yellow" if k == res.weakest_step else None
        t.add_row(str(k), f"{row['from']} → {row['to']}", f"{row['mean_abs_corr']:.3f}",
                  f"{row['min_confidence']:.3f}", f"{row['median_confidence']:.3f}",
                  str(row["n_low_confidence"]), style=style)
    out.print(t)
    out.print(f"weakest step: {res.weakest_step}")
    if res.bridges:
        skipped = sorted(set(range(n)) - set(res.path))
        out.print(f"path: {' → '.join(map(str, res.path))} (bridges tried: "
                  + ", ".join(f"{i}→{j}: {k} flagged" for (i, j), k in res.bridges.items())
                  + (f"; skipped {', '.join(map(str, skipped))})" if skipped else ")"),
                  soft_wrap=True)


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
    from . import jobs

    doc = jobs.compose(gauges, force=force)
    doc.save(output, overwrite=overwrite)
    written(f"composed {len(gauges)} gauges (d={doc.gauge.d}) → {output}")


@command(inputs=("gauge",), outputs=("output",))
def invert(
    gauge: Annotated[Path, typer.Argument(help="gauge A → B")],
    output: Annotated[Path, typer.Option("-o", "--output", help="gauge B → A")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Invert a gauge (B → A)."""
    from . import jobs

    jobs.invert(gauge).save(output, overwrite=overwrite)
    written(f"inverse written to {output}")


@command(inputs=("estimate", "reference"))
def compare(
    estimate: Annotated[Path, typer.Argument(help="estimated gauge")],
    reference: Annotated[Path, typer.Argument(help="reference gauge")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Permutation, sign and full accuracy of an estimated gauge against a reference."""
    from . import jobs

    c = jobs.compare(estimate, reference)
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
    model: Annotated[Path | None, typer.Option(help=option_help("model"))] = None,
    family: Annotated[str | None, typer.Option(help=option_help("family"))] = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="the checkpoint the moved object belongs to: recorded with its gauge-invariant "
        "fingerprint")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Move a coordinate-indexed object (steering vector, SAE, transcoder, crosscoder, neuron
    list, LoRA adapter, optimizer state, ...) to chart B, in its own format."""
    from . import jobs

    options = {k: v for k, v in (("model", model), ("family", family)) if v is not None}
    check_options(transport_kind(kind), options)
    info = jobs.transport(kind, source, output, [None if g == "-" else g for g in gauge],
                          inverse=inverse, checkpoint=checkpoint, overwrite=overwrite,
                          **options)
    # the counts; a record or a list (a whole gauge) is in the output file, not on one line
    detail = ", ".join(f"{k} {v}" for k, v in info.items() if not isinstance(
        v, dict | list | tuple))
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
    base: Annotated[Path | None, typer.Option(help=base_help())] = None,
    export_aligned: Annotated[Path | None, typer.Option(help="also write B in A's chart "
                              "here (for mergekit)")] = None,
    unaligned: Annotated[bool, typer.Option(help="merge without any alignment (a baseline)")
                         ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace existing outputs")] = False,
) -> None:
    """Coordinate-preserving merge: put B into A's chart, then merge."""
    from . import jobs

    if (gauge is None) != unaligned:
        raise GaugefixError("give --gauge G.json, or --unaligned for the unaligned baseline")
    info = jobs.merge(model_a, model_b, output, gauge, method=method, weight=weight, base=base,
                      export_aligned=export_aligned, overwrite=overwrite)
    written(f"merged {info['tensors']} tensors ({method}, w={weight}, "
            f"{'aligned' if info['aligned'] else 'UNALIGNED'}) → {output}")


# ---------------------------------------------------------------------------- audit
@command(inputs=("claim", "models", "claim_source", "tokens_from"), outputs=("output",))
def audit(
    claim: Annotated[Path, typer.Argument(help="claim file (gaugefix.claim/1 JSON)")],
    models: Annotated[list[str], typer.Argument(help="checkpoints to audit the claim on")],
    claim_source: Annotated[str | None, typer.Option(
        "--claim-source", help="the checkpoint the claim was made on (default: the claim's "
        "'source' field)")] = None,
    gauges: Annotated[int, typer.Option(callback=_range(0, 1000), help="random B_d and S_d "
                                        "re-gaugings per model")] = 4,
    seed: Annotated[int, typer.Option(callback=_range(0, MAX_SEED),
                                      help="seed of the random gauges")] = 0,
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
    from . import jobs

    res = jobs.audit(claim, models, source=claim_source, gauges=gauges, seed=seed,
                     opts=_stats_options(tokens_from, tokens, seed=seed, max_memory=max_memory,
                                         progress=False),
                     fingerprints=fingerprints)
    if output is not None:
        res.save(output, overwrite=overwrite)
    own = res.source_reproduction
    if own is not None and own < 1:
        _warn_line(f"the claim's coordinates are not the top-{res.report.claim_k} of its own "
                   f"prompts on its source {res.document['source']}: {own:.0%} reproduce there")
    if as_json:
        _print_json(res.document)
    else:
        _print_audit(res, claim.name)


def _print_audit(res: Any, claim: str) -> None:
    rep = res.report
    t = Table(title=f"audit of {claim}: top-{rep.claim_k} coordinates at position {rep.layer}")
    for col in ("model", "gauge", "raw index", "through gauge"):
        t.add_column(col, justify="left" if col in ("model", "gauge") else "right")
    for r in rep.rows:
        t.add_row(r.model, r.gauge, f"{r.raw:.0%}", f"{r.transported:.0%}")
    out.print(t)
    if res.source_reproduction is not None:
        out.print(f"on its own source: reproduces {res.source_reproduction:.0%}")
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
    seed: Annotated[int, typer.Option(callback=_range(0, MAX_SEED), help="random seed")] = 0,
    seeds: Annotated[int, typer.Option(
        callback=_range(1, 100), help="repeat the run-dependent headline figures on this many "
        "training runs (seeds SEED, SEED+1, ...) and report each as mean and range")] = 1,
    model: Annotated[str | None, typer.Option(
        "--model", help="run the experiments on this pretrained model instead (a checkpoint "
        "directory, a GGUF file or a hub id; an RMSNorm family with its tokenizer): ceiling, "
        "two fine-tuning runs, SAE, steering, refusal, optimizer state, audit, on real text "
        "that ships with Python")] = None,
    tiny: Annotated[Path | None, typer.Option(
        "--tiny", help="with --model: the output directory of an earlier `gaugefix demo`, "
        "whose results fill the table's tiny-demo column (default: OUT/tiny, run if "
        "missing)")] = None,
) -> None:
    """Reproduce the seed paper's headline results on tiny models trained here, or with
    --model on a pretrained model."""
    from .demo.command import run_requested

    run_requested(out_dir, quick=quick, seed=seed, seeds=seeds, device=device, model=model,
                  tiny=tiny, console=out)


def main() -> None:
    _process["console"] = True
    try:
        app()
    except KeyboardInterrupt:  # before a command's own handler was installed
        _error_line("interrupted; nothing was written")
        sys.exit(130)


if __name__ == "__main__":
    main()
