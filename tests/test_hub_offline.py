"""Hub ids resolved from a local Hugging Face cache with ``HF_HUB_OFFLINE=1``.

The test writes a tiny checkpoint into a fresh cache in huggingface_hub's on-disk layout
(``models--org--name/{blobs,refs/main,snapshots/<commit>}``, snapshot files symlinked to
content-addressed blobs), checks that huggingface_hub itself reads that cache, then runs the
``gaugefix`` console script in subprocesses with that cache, the hub switched off and an
unreachable endpoint: commands given the hub id work as on the directory, and an uncached id
is one clear ``error:`` line, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gaugefix.tiny import build_tiny

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _blob_name(path: Path) -> str:
    """The blob name huggingface_hub gives a file: the sha256 of an LFS file (weights), the
    git blob sha1 of any other."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def populate_cache(cache: Path, repo_id: str, commit: str, files: Path) -> Path:
    """Put the files of directory ``files`` into hub cache ``cache`` as revision ``main`` =
    ``commit`` of model repo ``repo_id``; returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        blob = _blob_name(f)
        (repo / "blobs" / blob).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # the commit hash, no newline
    return snapshot


@pytest.fixture
def hub(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """(the local directory, the environment of an offline gaugefix with a populated cache)."""
    local = tmp_path / "local"
    build_tiny("llama", seed=3).save_pretrained(local, max_shard_size="200KB")
    assert (local / "model.safetensors.index.json").is_file()  # sharded: index + shards
    home = tmp_path / "hf-home"
    populate_cache(home / "hub", REPO, COMMIT, local)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
                        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_ENDPOINT="http://127.0.0.1:9",  # were the hub asked, it would fail
               COLUMNS="200", TRANSFORMERS_VERBOSITY="error")
    return local, env


def gaugefix(env: dict[str, str], *args: object, ok: bool = True
             ) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("gaugefix")
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env,
                         timeout=300)
    if ok:
        assert res.returncode == 0, f"gaugefix {args} exited {res.returncode}:\n{res.stderr}"
    return res


def _listing(root: Path) -> dict[str, str]:
    """Every entry under ``root``: symlink targets, file digests."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_cache_layout_is_huggingface_hubs(hub: tuple[Path, dict[str, str]]) -> None:
    """huggingface_hub's own offline readers see the hand-written cache as a cached repo."""
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

    local, env = hub
    cache = Path(env["HF_HOME"]) / "hub"
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and rev.refs == frozenset({"main"})
    assert {f.file_name for f in rev.files} == {f.name for f in local.iterdir()}
    cached = try_to_load_from_cache(REPO, "config.json", cache_dir=cache)
    assert isinstance(cached, str) and Path(cached).read_text() == (
        local / "config.json").read_text()
    snapshot = snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    assert Path(snapshot) == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT


def test_hub_id_from_the_offline_cache(hub: tuple[Path, dict[str, str]], tmp_path: Path
                                       ) -> None:
    """With the hub off, ``inspect``, ``fingerprint`` and ``apply`` given the hub id read the
    cached snapshot: the same report and fingerprint as the directory, and ``apply`` writes
    the same bytes as on the directory, as regular files, leaving the cache untouched."""
    local, env = hub
    cache = Path(env["HF_HOME"]) / "hub"
    before = _listing(cache)

    rep_hub = json.loads(gaugefix(env, "inspect", REPO, "--json").stdout)
    rep_local = json.loads(gaugefix(env, "inspect", local, "--json").stdout)
    assert rep_hub["family"] == "llama" and rep_hub["hidden_size"] == 64
    assert rep_hub == rep_local
    assert (gaugefix(env, "fingerprint", REPO).stdout
            == gaugefix(env, "fingerprint", local).stdout)

    gaugefix(env, "apply", REPO, tmp_path / "B", "--random", 5, "--gauge-out",
             tmp_path / "g.json")
    gaugefix(env, "apply", local, tmp_path / "B-local", "--gauge", tmp_path / "g.json")
    names = sorted(f.name for f in (tmp_path / "B").iterdir())
    assert names == sorted(f.name for f in (tmp_path / "B-local").iterdir())
    assert not any((tmp_path / "B" / n).is_symlink() for n in names)
    assert len([n for n in names if n.endswith(".safetensors")]) >= 2
    for n in names:
        got, want = tmp_path / "B" / n, tmp_path / "B-local" / n
        if n.endswith(".safetensors"):
            x, y = load_file(got), load_file(want)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in y), n
        else:  # config, generation config, shard index: as apply writes them from a dir
            assert got.read_bytes() == want.read_bytes(), n
    # B is A re-gauged, not a copy: the weights moved, the function did not
    moved = load_file(tmp_path / "B" / "model-00001-of-00002.safetensors")
    orig = load_file(local / "model-00001-of-00002.safetensors")
    assert any(not torch.equal(moved[k], orig[k]) for k in orig)
    res = gaugefix(env, "identify", REPO, tmp_path / "B")
    assert res.stdout.startswith("same"), res.stdout
    assert _listing(cache) == before


def test_uncached_hub_id_offline_is_one_clear_error(hub: tuple[Path, dict[str, str]],
                                                    tmp_path: Path) -> None:
    """An id not in the cache, with the hub off: one ``error:`` line naming the id and saying
    it is not in the local cache (and which cache), exit 2, nothing written."""
    _, env = hub
    cache = Path(env["HF_HOME"]) / "hub"
    for args in (("inspect", "other-org/not-cached"),
                 ("apply", "other-org/not-cached", tmp_path / "out", "--random", 1)):
        res = gaugefix(env, *args, ok=False)
        assert res.returncode == 2, res.stderr
        err = res.stderr.strip()
        assert err.startswith("error:") and "\n" not in err, err
        assert "other-org/not-cached" in err and "not in the local Hugging Face cache" in err
        assert str(cache) in err and "HF_HUB_OFFLINE" in err
        assert not res.stdout.strip()
    assert not (tmp_path / "out").exists()
