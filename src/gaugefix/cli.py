"""Command-line interface: a thin layer over the API.

Every user error is a :class:`GaugefixError`, printed as one line
(``error: ...``) with exit status 2; a failed check (``verify``) exits 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from .errors import GaugefixError

app = typer.Typer(
    help="Fix the residual-stream gauge of transformer checkpoints and move coordinate-"
    "indexed objects between them. Convention: x_B[i] = sign[i] * x_A[perm[i]].",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # transformers import failures surface where it is used
        pass


def command(fn: F) -> F:
    """Register a command whose GaugefixError becomes a one-line error and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except GaugefixError as exc:
            err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None

    app.command()(wrapper)
    return fn


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------- inspect
@command
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


# ---------------------------------------------------------------------------- apply
@command
def apply(
    model: Annotated[str, typer.Argument(help="checkpoint directory (chart A) or hub id")],
    output: Annotated[Path, typer.Argument(help="output directory (chart B)")],
    gauge: Annotated[Path | None, typer.Option(help="gauge file to apply")] = None,
    random: Annotated[int | None, typer.Option("--random", help="apply a random gauge "
                      "drawn with this seed (B_d for RMSNorm, S_d×{±1} for LayerNorm)")] = None,
    kind: Annotated[str | None, typer.Option(help="random gauge kind: signed, perm or "
                    "global (default: the family's full group)")] = None,
    positive_fraction: Annotated[float | None, typer.Option(
        help="random signed gauge: fraction of +1 signs")] = None,
    gauge_out: Annotated[Path | None, typer.Option(help="write the applied gauge here")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing outputs")] = False,
) -> None:
    """Write MODEL in another gauge: same function, weights gathered and sign-flipped."""
    from .apply import checkpoint_identity, gauge_checkpoint
    from .checkpoint import Checkpoint
    from .group import SignedPerm
    from .io import check_output

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
    if gauge_out is not None:
        check_output(gauge_out, overwrite)
    rep = gauge_checkpoint(ckpt.path, output, g, overwrite=overwrite)
    out.print(
        f"{rep.family}: d={rep.d}, {rep.n_transformed}/{rep.n_tensors} tensors transformed "
        f"({', '.join(f'{k}×{n}' for k, n in sorted(rep.ops.items()))}) in {rep.shards} "
        f"shard(s), {rep.bytes_written / 1e6:.1f} MB → {output}"
    )
    if gauge_out is not None:
        meta = {"source": checkpoint_identity(ckpt.path), "target": checkpoint_identity(output),
                "method": method}
        g.save(gauge_out, meta, overwrite=overwrite)
        out.print(f"gauge written to {gauge_out}")


# ---------------------------------------------------------------------------- verify
@command
def verify(
    model_a: Annotated[str, typer.Argument(help="checkpoint in chart A")],
    model_b: Annotated[str, typer.Argument(help="checkpoint in chart B")],
    gauge: Annotated[Path, typer.Option(help="gauge A → B")],
    tokens: Annotated[int, typer.Option(help="number of probe tokens")] = 256,
    tol: Annotated[float, typer.Option(help="maximum relative error")] = 1e-4,
    dtype: Annotated[str, typer.Option(help="float32, float64, bfloat16, float16")] = "float32",
    seed: Annotated[int, typer.Option(help="probe-token seed")] = 0,
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


# ---------------------------------------------------------------------------- demo
@command
def demo(
    out_dir: Annotated[Path | None, typer.Option("--out", help="working directory "
                       "(default: a temporary one)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """End-to-end example on a tiny Llama-family model built offline."""
    from .demo import run_core_demo

    run_core_demo(out_dir, seed=seed, console=out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
