"""The package as users install it: a wheel built from the sources, installed into a fresh
virtual environment that cannot see the source tree, runs inspect, apply and verify.

(The fresh environment gets gaugefix from the wheel alone; its dependencies, too large to
install again here, come from the test environment through a path entry, and pip checks
that they satisfy what the wheel declares.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: object, cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, (args, res.stdout[-2000:], res.stderr[-2000:])
    return res


def _fresh_env(wheel: Path, tmp_path: Path, dependencies: Path
               ) -> tuple[Path, Path, dict[str, str]]:
    """A new venv holding the wheel, whose dependencies come from ``dependencies`` (a
    folder put on its path by a .pth file): (its bin folder, a working folder outside the
    checkout, the environment to run it with)."""
    env_dir = tmp_path / "env"
    _run(sys.executable, "-m", "venv", env_dir, cwd=tmp_path)
    py = env_dir / "bin" / "python"
    _run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    site = Path(subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip())
    (site / "zz_dependencies.pth").write_text(f"{dependencies}\n")
    home = tmp_path / "elsewhere"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200")
    return env_dir / "bin", home, env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("build")
    src = work / "project"  # a copy: building must not write into the checkout
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", work / "dist", src, cwd=work)
    (whl,) = (work / "dist").glob("gaugefix-*.whl")
    return whl


def test_the_wheel_ships_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "src" / "gaugefix"
    expected = {f"gaugefix/{p.relative_to(package).as_posix()}" for p in package.rglob("*")
                if p.is_file() and p.suffix in (".py", ".json", ".typed")
                and "__pycache__" not in p.parts}
    assert expected - names == set()
    meta = next(n for n in names if n.endswith("METADATA"))
    requires = [ln for ln in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert any("torch" in r for r in requires) and any("transformers" in r for r in requires)


def test_installed_wheel_runs_inspect_apply_verify(wheel, tmp_path, tiny_ckpt):
    # the test environment's packages (not its gaugefix: .pth files there are not processed)
    bin_dir, home, env = _fresh_env(wheel, tmp_path, Path(sysconfig.get_paths()["purelib"]))
    env_dir, py = bin_dir.parent, bin_dir / "python"

    where = _run(py, "-c", "import gaugefix; print(gaugefix.__file__)", cwd=home, env=env)
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True,
                           env=env, cwd=home)
    assert not [ln for ln in check.stdout.splitlines() if ln.lower().startswith("gaugefix ")]

    exe = env_dir / "bin" / "gaugefix"
    model = tiny_ckpt("llama", seed=3)
    inspected = json.loads(_run(exe, "inspect", model, "--json", cwd=home, env=env).stdout)
    assert inspected["family"] == "llama" and inspected["gauge_group"] == "B_d"
    _run(exe, "apply", model, home / "B", "--random", 4, "--gauge-out", home / "g.json",
         cwd=home, env=env)
    verified = json.loads(_run(exe, "verify", model, home / "B", "--gauge", home / "g.json",
                               "--json", cwd=home, env=env).stdout)
    assert verified["passed"] and verified["max_rel_err"] < 1e-5
    bad = subprocess.run([exe, "apply", model, home / "C"], capture_output=True, text=True,
                         env=env, cwd=home)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and bad.stderr.count(
        "\n") == 1


def _installed_requirements() -> set[str]:
    """The distributions gaugefix's own dependencies need, transitively (no extras): what a
    plain ``pip install gaugefix`` brings, found in the test environment."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [Requirement(r) for r in md.requires("gaugefix") or ()]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in md.requires(req.name) or ()]
        except md.PackageNotFoundError:
            pytest.fail(f"{req.name}, a dependency of gaugefix, is not installed here")
    return seen


def _plain_site(root: Path) -> Path:
    """A folder that holds (as links) only the test environment's distributions that a plain
    install of gaugefix brings: not accelerate, PEFT, SAELens or anything else of the test
    extra, unless gaugefix itself depends on it."""
    import importlib.metadata as md

    from packaging.utils import canonicalize_name

    wanted = _installed_requirements()
    site = root / "plain-site"
    site.mkdir()
    for dist in md.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in wanted:
            continue
        for f in dist.files or ():
            top = Path(f).parts[0]
            if top in ("..", "bin") or top.endswith(".pth"):
                continue
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    return site


def test_a_plain_install_runs_verify_and_match_on_a_gguf_file(wheel, tmp_path):
    """Every README command runs after ``pip install gaugefix`` alone: a fresh environment
    with the wheel and only the distributions its own dependencies bring (nothing of the test
    extra: transformers loads a GGUF file only with accelerate, which must be gaugefix's own
    dependency) runs inspect, apply, verify, match, identify, fingerprint and canonicalize
    on a GGUF file."""
    from gaugefix.testing import write_tiny_gguf

    bin_dir, home, env = _fresh_env(wheel, tmp_path, _plain_site(tmp_path))
    py = bin_dir / "python"
    for extra in ("peft", "sae_lens", "pytest"):
        probe = subprocess.run([py, "-c", f"import {extra}"], capture_output=True, text=True,
                               env=env, cwd=home)
        assert probe.returncode != 0, f"the plain environment must not see {extra}"
    from gaugefix.tiny import build_tiny

    model = build_tiny("llama", seed=0, hidden_size=64, vocab_size=96, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    src = write_tiny_gguf(home / "m.gguf", model)
    exe = bin_dir / "gaugefix"
    _run(exe, "inspect", src, cwd=home, env=env)
    _run(exe, "apply", src, home / "moved.gguf", "--random", 2, "--gauge-out",
         home / "g.json", cwd=home, env=env)
    verified = json.loads(_run(exe, "verify", src, home / "moved.gguf", "--gauge",
                               home / "g.json", "--json", cwd=home, env=env).stdout)
    assert verified["passed"], verified
    _run(exe, "match", src, home / "moved.gguf", "--source", "weights", "-o",
         home / "est.json", cwd=home, env=env)
    compared = json.loads(_run(exe, "compare", home / "est.json", home / "g.json", "--json",
                               cwd=home, env=env).stdout)
    assert compared["full_accuracy"] == 1.0, compared
    same = json.loads(_run(exe, "identify", src, home / "moved.gguf", "--json", cwd=home,
                           env=env).stdout)
    assert same["verdict"] == "same", same
    prints = {json.loads(_run(exe, "fingerprint", m, "--json", cwd=home, env=env).stdout)[
        "fingerprint"] for m in (src, home / "moved.gguf")}
    assert len(prints) == 1
    _run(exe, "canonicalize", src, home / "canonical.gguf", cwd=home, env=env)
    assert (home / "canonical.gguf").stat().st_size > 0
