"""Gauge files name checkpoints by content: format 2 by the BLAKE3 of their weight files,
format 1 (still read) by their sha256; compose compares whichever hash both files record."""

from __future__ import annotations

import hashlib
import json

import blake3
import pytest

from gaugefix import jobs
from gaugefix.checkpoint import Checkpoint
from gaugefix.errors import GaugefixError
from gaugefix.gaugefile import GAUGE_FORMAT, same_chart
from gaugefix.group import SignedPerm
from gaugefix.model import open_model


def _concatenated(paths) -> bytes:
    return b"".join(p.read_bytes() for p in paths)


def test_apply_records_each_checkpoint_by_the_blake3_of_its_weight_files(tmp_path, tiny_ckpt):
    src = tiny_ckpt("llama", seed=1)
    out = tmp_path / "B"
    jobs.apply(src, out, random=3, gauge_out=tmp_path / "g.json", progress=False)
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["format"] == GAUGE_FORMAT == "gaugefix.gauge/2"
    shards = Checkpoint.open(src).shards
    for chart, files in (("source", shards), ("target", [out / s.name for s in shards])):
        assert set(doc[chart]) == {"name", "blake3"}, doc[chart]
        # what `cat FILES | b3sum` prints: hashed on the way equals hashed from the files
        assert doc[chart]["blake3"] == blake3.blake3(_concatenated(files)).hexdigest(), chart
    assert open_model(out).identity()["blake3"] == doc["target"]["blake3"]  # read back


def _old(tmp_path, name, gauge, source, target):
    """A gauge file as gaugefix wrote it before format 2: sha256 identities."""
    doc = {**gauge.to_json(), "format": "gaugefix.gauge/1", "method": "random(seed=0)",
           "source": source, "target": target}
    (tmp_path / name).write_text(json.dumps(doc))
    return tmp_path / name


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_an_old_gauge_file_loads_and_its_sha256_is_compared(tmp_path, cli):
    g1, g2 = SignedPerm.random(16, seed=1), SignedPerm.random(16, seed=2)
    _old(tmp_path, "g1.json", g1, {"name": "A", "sha256": _sha("A")},
         {"name": "B", "sha256": _sha("B")})
    assert SignedPerm.load(tmp_path / "g1.json") == g1
    # the same checkpoint under another name: chained by its sha256
    _old(tmp_path, "g2.json", g2, {"name": "B-copy", "sha256": _sha("B")},
         {"name": "C", "sha256": _sha("C")})
    res = cli("compose", tmp_path / "g1.json", tmp_path / "g2.json", "-o", tmp_path / "c.json")
    assert "warning" not in res.stderr
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["format"] == GAUGE_FORMAT and SignedPerm.from_json(doc) == g1.then(g2)
    assert doc["source"]["sha256"] == _sha("A") and doc["target"]["sha256"] == _sha("C")
    # a name in common but another sha256: another checkpoint
    _old(tmp_path, "g3.json", g2, {"name": "B", "sha256": _sha("B2")}, {"name": "C"})
    res = cli("compose", tmp_path / "g1.json", tmp_path / "g3.json", "-o", tmp_path / "x.json",
              ok=False)
    assert res.exit_code == 2 and "(compared by sha256): the gauges do not chain" in res.stderr
    # an old file and its inverse (written in format 2) chain back to where they started
    cli("invert", tmp_path / "g1.json", "-o", tmp_path / "inv.json")
    cli("compose", tmp_path / "g1.json", tmp_path / "inv.json", "-o", tmp_path / "e.json")
    assert SignedPerm.load(tmp_path / "e.json") == SignedPerm.identity(16)


def test_compose_across_hash_kinds_says_it_compared_names_only(tmp_path, tiny_ckpt):
    """A format-1 file (sha256) before a format-2 file (blake3) of the same checkpoint: no
    hash in common, so the names decide, and a warning says so."""
    a = tiny_ckpt("llama", seed=1)
    b = tmp_path / "B"
    jobs.apply(a, b, random=3, gauge_out=tmp_path / "new.json", progress=False)  # B -> ...
    new = json.loads((tmp_path / "new.json").read_text())
    g0 = SignedPerm.random(64, seed=7)
    old = _old(tmp_path, "old.json", g0, {"name": "Z", "sha256": _sha("Z")},
               {"name": new["source"]["name"], "sha256": _sha("A")})
    with pytest.warns(UserWarning, match=r"old\.json records its target's sha256, \S*new\.json "
                      r"its source's blake3: no content hash in common, so the charts are "
                      r"compared by name only"):
        doc = jobs.compose([old, tmp_path / "new.json"])
    assert doc.gauge == g0.then(SignedPerm.load(tmp_path / "new.json"))
    assert doc.metadata["source"]["sha256"] == _sha("Z")
    assert doc.metadata["target"]["blake3"] == new["target"]["blake3"]

    renamed = _old(tmp_path, "renamed.json", g0, {"name": "Z"},
                   {"name": "elsewhere", "sha256": _sha("A")})
    with pytest.warns(UserWarning, match="no content hash in common"), \
            pytest.raises(GaugefixError, match=r"\(compared by name\): the gauges do not chain"):
        jobs.compose([renamed, tmp_path / "new.json"])


@pytest.mark.parametrize(("a", "b", "expected"), [
    ({"name": "x", "blake3": "1", "sha256": "2"}, {"name": "y", "blake3": "1"}, (True, "blake3")),
    ({"name": "x", "blake3": "1", "sha256": "2"}, {"name": "x", "blake3": "1", "sha256": "3"},
     (False, "blake3+sha256")),
    ({"name": "x", "sha256": "2"}, {"name": "x", "blake3": "1"}, (True, "name")),
    ({"name": "x"}, {"blake3": "1"}, (None, "")),
    (None, {"name": "x"}, (None, "")),
])
def test_same_chart_compares_every_hash_both_record(a, b, expected):
    assert same_chart(a, b) == expected
