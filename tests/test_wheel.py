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
    env_dir = tmp_path / "env"
    _run(sys.executable, "-m", "venv", env_dir, cwd=tmp_path)
    py = env_dir / "bin" / "python"
    _run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    site = Path(subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip())
    # the test environment's packages (not its gaugefix: .pth files there are not processed)
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    home = tmp_path / "elsewhere"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200")

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
