"""Transport of objects in their users' formats, loaded back by the real clients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gaugefix.apply import gauge_model
from gaugefix.demo.steer import sentiment_direction, sentiment_effect
from gaugefix.group import SignedPerm
from gaugefix.stats import ResidualTap, residuals
from gaugefix.testing import nmse, sae_reconstruct, save_saelens, train_sae


@pytest.fixture(scope="module")
def world(trained_llama):
    """Model A (trained), a B_d gauge, B = Q·A, and the permutation-only 'gauge'."""
    a = trained_llama.base
    g = SignedPerm.random(64, seed=21, positive_fraction=0.5)
    return a, g, gauge_model(a, g), g.unsigned()


@pytest.fixture
def gauge_files(world, tmp_path):
    _, g, _, perm_only = world
    g.save(tmp_path / "g.json")
    perm_only.save(tmp_path / "perm.json")
    return tmp_path / "g.json", tmp_path / "perm.json"


def _acts(model, ids, position):
    from gaugefix.arch import detect_family

    with ResidualTap(model, detect_family(model.config), [position]) as tap:
        return residuals(model, ids, tap)[position]


def _ids(lineage, n=4096):
    return torch.from_numpy(lineage.probe(n)).view(-1, 128)


def _same_tensors(a_dir, b_dir, name):
    a, b = load_file(a_dir / name), load_file(b_dir / name)
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- SAE
def test_sae_transport_preserves_reconstruction_and_saelens_loads_it(world, trained_llama,
                                                                      gauge_files, tmp_path, cli):
    from sae_lens import SAE

    from .conftest import fixture_failed

    a, g, b, _ = world
    g_file, perm_file = gauge_files
    ids = _ids(trained_llama)
    xa, xb = _acts(a, ids, 1), _acts(b, ids, 1)
    sae = train_sae(xa, 256, steps=400)
    # dropping the signs hands the SAE B's activations with the negative-sign coordinates
    # flipped: D·x_A in A's own chart, D[j] = sign of the B coordinate that j lands on
    d = torch.from_numpy(g.sign[g.inverse().perm].astype(np.float32))
    e_a, e_flipped = (nmse(x, sae_reconstruct(sae, x)) for x in (xa, xa * d))
    if not (e_a < 0.3 and e_flipped > 2 * e_a):
        fixture_failed("SAE", f"the trained SAE reconstructs with NMSE {e_a:.3f} and with the "
                       f"flips {e_flipped:.3f} (needs < 0.3, and more than twice that)")
    src = save_saelens(tmp_path / "sae-A", sae, hook_name="model.layers.0")
    cli("transport", "sae", src, "--gauge", g_file, "-o", tmp_path / "sae-B")
    cli("transport", "sae", src, "--gauge", perm_file, "-o", tmp_path / "sae-perm")

    orig = SAE.load_from_disk(str(src))
    moved = SAE.load_from_disk(str(tmp_path / "sae-B"))
    wrong = SAE.load_from_disk(str(tmp_path / "sae-perm"))
    with torch.no_grad():
        e_orig = nmse(xa, orig(xa))
        e_b = nmse(xb, moved(xb))
        e_perm = nmse(xb, wrong(xb))
    assert abs(e_orig - e_a) < 1e-6  # our SAE = SAELens' reading of it
    assert abs(e_b - e_a) < 1e-5  # moved with its signs: the same reconstruction on B
    assert abs(e_perm - e_flipped) < 1e-5  # without them: the flipped inputs' error
    # the transport is recorded in the safetensors metadata
    from safetensors import safe_open

    with safe_open(str(tmp_path / "sae-B" / "sae_weights.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["gaugefix"])["direction"] == "A->B"
    # round trip: bit-identical tensors
    cli("transport", "sae", tmp_path / "sae-B", "--gauge", g_file, "--inverse", "-o",
        tmp_path / "sae-back")
    assert _same_tensors(src, tmp_path / "sae-back", "sae_weights.safetensors")


@pytest.mark.parametrize("arch", ["JumpReLUSAE", "TopKSAE", "GatedSAE", "Transcoder",
                                  "SkipTranscoder"])
def test_every_saelens_architecture_is_equivariant(arch, tmp_path, cli):
    import sae_lens.saes as saes
    from sae_lens import SAE

    cfgs = {
        "JumpReLUSAE": saes.JumpReLUSAEConfig(d_in=64, d_sae=96),
        "TopKSAE": saes.TopKSAEConfig(d_in=64, d_sae=96, k=8),
        "GatedSAE": saes.GatedSAEConfig(d_in=64, d_sae=96),
        "Transcoder": saes.TranscoderConfig(d_in=64, d_sae=96, d_out=64,
                                            apply_b_dec_to_input=False),
        "SkipTranscoder": saes.SkipTranscoderConfig(d_in=64, d_sae=96, d_out=64,
                                                    apply_b_dec_to_input=False),
    }
    torch.manual_seed(0)
    sae = getattr(saes, arch)(cfgs[arch])
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.2)
    sae.save_model(str(tmp_path / "A"))
    g = SignedPerm.random(64, seed=3)
    g.save(tmp_path / "g.json")
    cli("transport", "sae", tmp_path / "A", "--gauge", tmp_path / "g.json", "-o", tmp_path / "B")
    moved = SAE.load_from_disk(str(tmp_path / "B"))
    x = torch.randn(32, 64)
    with torch.no_grad():
        expected = g.apply(sae(x), 1)
        got = moved(g.apply(x, 1))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    cli("transport", "sae", tmp_path / "B", "--gauge", tmp_path / "g.json", "--inverse", "-o",
        tmp_path / "A2")
    assert _same_tensors(tmp_path / "A", tmp_path / "A2", "sae_weights.safetensors")


def test_sparsify_layout(tmp_path, cli):
    from safetensors.torch import save_file

    folder = tmp_path / "layers.3"
    folder.mkdir()
    t = {"encoder.weight": torch.randn(96, 64), "encoder.bias": torch.randn(96),
         "W_dec": torch.randn(96, 64), "b_dec": torch.randn(64)}
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"num_latents": 96, "k": 8, "d_in": 64}))
    g = SignedPerm.random(64, seed=4)
    g.save(tmp_path / "g.json")
    cli("transport", "sae", folder, "--gauge", tmp_path / "g.json", "-o", tmp_path / "out")
    m = load_file(tmp_path / "out" / "sae.safetensors")
    x = torch.randn(8, 64)

    def fwd(w, x):
        z = torch.relu(x @ w["encoder.weight"].T + w["encoder.bias"])
        return z @ w["W_dec"] + w["b_dec"]

    assert torch.allclose(fwd(m, g.apply(x, 1)), g.apply(fwd(t, x), 1), atol=1e-4)


@pytest.mark.parametrize(
    "cfg_patch, message",
    [({"reshape_activations": "hook_z"}, "hook_z"),
     ({"metadata": {"hook_name": "blocks.3.mlp.hook_post"}}, "not in residual coordinates"),
     ({"metadata": {"hook_name": "blocks.3.attn.hook_q"}}, "not in residual coordinates"),
     ({"normalize_activations": "layer_norm"}, "layer_norm")],
)
def test_sae_refusals(cfg_patch, message, tmp_path, cli):
    sae = {"W_enc": torch.randn(64, 96), "b_enc": torch.zeros(96), "W_dec": torch.randn(96, 64),
           "b_dec": torch.zeros(64)}
    src = save_saelens(tmp_path / "sae", sae, hook_name="blocks.3.hook_resid_post")
    cfg = json.loads((src / "cfg.json").read_text())
    cfg.update(cfg_patch)
    (src / "cfg.json").write_text(json.dumps(cfg))
    SignedPerm.random(64, seed=0, positive_fraction=0.5).save(tmp_path / "g.json")
    res = cli("transport", "sae", src, "--gauge", tmp_path / "g.json", "-o", tmp_path / "o",
              ok=False)
    assert res.exit_code == 2 and message in res.stderr and not (tmp_path / "o").exists()


def test_layernorm_normalised_sae_accepts_a_global_sign(tmp_path, cli):
    sae = {"W_enc": torch.randn(64, 96), "b_enc": torch.zeros(96), "W_dec": torch.randn(96, 64),
           "b_dec": torch.zeros(64)}
    src = save_saelens(tmp_path / "sae", sae, hook_name="blocks.3.hook_resid_post")
    cfg = json.loads((src / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (src / "cfg.json").write_text(json.dumps(cfg))
    SignedPerm.random(64, seed=0, kind="global").save(tmp_path / "g.json")
    cli("transport", "sae", src, "--gauge", tmp_path / "g.json", "-o", tmp_path / "o")


# ---------------------------------------------------------------------------- steering
def test_steering_effect_is_preserved_only_with_signs(world, trained_llama, gauge_files,
                                                      tmp_path, cli):
    """The fixture establishes a sentiment direction v that steers A both ways. Moved with its
    signs, v steers B exactly as it steers A. Moved by permutation alone under a gauge that
    flips every sign, it is −v in disguise: it steers B exactly as −v steers A, the wrong way."""

    a, _, b, _ = world
    g_file, _ = gauge_files
    corpus = trained_llama.corpus
    layer, v, eff_a, eff_minus = trained_llama.sentiment  # eff_a > 0.05 > -0.05 > eff_minus
    torch.save(v, tmp_path / "v.pt")
    cli("transport", "steering", tmp_path / "v.pt", "--gauge", g_file, "-o", tmp_path / "vb.pt")
    vb = torch.load(tmp_path / "vb.pt", weights_only=True)
    assert abs(sentiment_effect(b, corpus, layer, vb) / eff_a - 1) < 1e-4

    flip = SignedPerm.random(64, seed=22, positive_fraction=0.0)
    flip.unsigned().save(tmp_path / "flip-perm-only.json")
    cli("transport", "steering", tmp_path / "v.pt", "--gauge", tmp_path / "flip-perm-only.json",
        "-o", tmp_path / "vp.pt")
    vp = torch.load(tmp_path / "vp.pt", weights_only=True)
    eff_p = sentiment_effect(gauge_model(a, flip), corpus, layer, vp)
    assert abs(eff_p - eff_minus) < 1e-4 * abs(eff_minus)
    assert eff_p < -0.05  # the effect reverses


def test_steering_vectors_client_and_every_file_layout(world, trained_llama, tmp_path, cli):
    from steering_vectors import SteeringVector

    a, g, b, _ = world
    g.save(tmp_path / "g.json")
    v = 8 * sentiment_direction(a, trained_llama.corpus, 0)
    sv = SteeringVector(layer_activations={0: v, 1: -v})
    torch.save(sv, tmp_path / "sv.pt")
    cli("transport", "steering", tmp_path / "sv.pt", "--gauge", tmp_path / "g.json", "-o",
        tmp_path / "sv_b.pt")
    with torch.serialization.safe_globals([SteeringVector]):
        sv_b = torch.load(tmp_path / "sv_b.pt", weights_only=True)
    assert isinstance(sv_b, SteeringVector) and sv_b.layer_type == sv.layer_type
    ids = _ids(trained_llama, 1024)[:4]
    with torch.no_grad(), sv.apply(a, multiplier=1.0):
        la = a(ids).logits
    with torch.no_grad(), sv_b.apply(b, multiplier=1.0):
        lb = b(ids).logits
    assert torch.allclose(la, lb, atol=1e-4)

    # dict .pt, safetensors, npy, repeng/llama.cpp GGUF: transported and back, bit-exact
    from gaugefix.transport.steering import read_control_vector, write_control_vector

    torch.save({5: v, 7: -v}, tmp_path / "d.pt")
    from safetensors.torch import save_file

    save_file({"layer.3": v.contiguous(), "all": torch.stack([v, -v])},
              str(tmp_path / "s.safetensors"))
    np.save(tmp_path / "n.npy", v.numpy())
    write_control_vector(tmp_path / "c.gguf", {1: v.numpy(), 2: -v.numpy()}, "llama")
    for name in ("d.pt", "s.safetensors", "n.npy", "c.gguf"):
        stem, suffix = name.split(".")
        cli("transport", "steering", tmp_path / name, "--gauge", tmp_path / "g.json", "-o",
            tmp_path / f"{stem}_b.{suffix}")
        cli("transport", "steering", tmp_path / f"{stem}_b.{suffix}", "--gauge",
            tmp_path / "g.json", "--inverse", "-o", tmp_path / f"{stem}_a.{suffix}")
    assert torch.equal(torch.load(tmp_path / "d_b.pt", weights_only=True)[5], g.apply(v))
    back = torch.load(tmp_path / "d_a.pt", weights_only=True)
    assert torch.equal(back[5], v) and torch.equal(back[7], -v)
    assert _same_tensors(tmp_path, tmp_path, "s.safetensors")
    # the record can name the checkpoint the object now belongs to by its fingerprint
    a.save_pretrained(tmp_path / "A")
    cli("transport", "steering", tmp_path / "s.safetensors", "--gauge", tmp_path / "g.json",
        "-o", tmp_path / "s_named.safetensors", "--checkpoint", tmp_path / "A")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s_named.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["gaugefix"])
    fp = cli("fingerprint", tmp_path / "A").stdout.strip()
    assert record["checkpoint"] == {"name": str(tmp_path / "A"), "fingerprint": fp}
    assert torch.equal(load_file(tmp_path / "s_a.safetensors")["all"], torch.stack([v, -v]))
    assert np.array_equal(np.load(tmp_path / "n_a.npy"), v.numpy())
    dirs_b, meta = read_control_vector(tmp_path / "c_b.gguf")
    assert meta["model_hint"] == "llama" and meta["layer_count"] == 2
    assert np.array_equal(dirs_b[1], g.apply(v).numpy())
    dirs_a, _ = read_control_vector(tmp_path / "c_a.gguf")
    assert np.array_equal(dirs_a[2], -v.numpy())


def test_steering_bad_inputs(tmp_path, cli):
    SignedPerm.random(64, seed=0).save(tmp_path / "g.json")
    torch.save(torch.zeros(32), tmp_path / "narrow.pt")
    res = cli("transport", "steering", tmp_path / "narrow.pt", "--gauge", tmp_path / "g.json",
              "-o", tmp_path / "o.pt", ok=False)
    assert res.exit_code == 2 and "width mismatch" in res.stderr
    torch.save(["not", "a", "vector"], tmp_path / "list.pt")
    res = cli("transport", "steering", tmp_path / "list.pt", "--gauge", tmp_path / "g.json",
              "-o", tmp_path / "o.pt", ok=False)
    assert res.exit_code == 2 and "unknown .pt layout" in res.stderr
    (tmp_path / "v.txt").write_text("1 2 3")
    res = cli("transport", "steering", tmp_path / "v.txt", "--gauge", tmp_path / "g.json",
              "-o", tmp_path / "o.txt", ok=False)
    assert res.exit_code == 2 and "unknown file type" in res.stderr
    (tmp_path / "fake.gguf").write_bytes(b"not gguf at all")
    res = cli("transport", "steering", tmp_path / "fake.gguf", "--gauge", tmp_path / "g.json",
              "-o", tmp_path / "o.gguf", ok=False)
    assert res.exit_code == 2 and "not a GGUF file" in res.stderr
    res = cli("transport", "sae", tmp_path / "narrow.pt", "--gauge", tmp_path / "g.json",
              "-o", tmp_path / "o", ok=False)
    assert res.exit_code == 2 and "not an SAE folder" in res.stderr
    assert not list(tmp_path.glob("o*"))


# ---------------------------------------------------------------------------- neurons
def test_neuron_sets_keep_their_meaning(world, trained_llama, tmp_path, cli):
    a, g, b, _ = world
    g.save(tmp_path / "g.json")
    ids = _ids(trained_llama, 2048)
    mean_a, mean_b = _acts(a, ids, 2).mean(0), _acts(b, ids, 2).mean(0)
    top = torch.argsort(mean_a.abs(), descending=True)[:10].tolist()
    entries = [{"index": j, "score": float(mean_a[j]), "layer": 2, "note": f"n{j}"}
               for j in top]
    (tmp_path / "top.json").write_text(json.dumps({"model": "A", "entries": entries}))
    cli("transport", "neurons", tmp_path / "top.json", "--gauge", tmp_path / "g.json", "-o",
        tmp_path / "top_b.json")
    moved = json.loads((tmp_path / "top_b.json").read_text())
    assert moved["model"] == "A"
    for e, m in zip(entries, moved["entries"], strict=True):
        # the claim "coordinate j has mean activation s" holds in B for gauge_sign · x_B[i]
        assert m["note"] == e["note"] and m["layer"] == 2
        assert abs(m["gauge_sign"] * float(mean_b[m["index"]]) - e["score"]) < 1e-4
        assert m["score"] == pytest.approx(float(mean_b[m["index"]]), abs=1e-4)
    cli("transport", "neurons", tmp_path / "top_b.json", "--gauge", tmp_path / "g.json",
        "--inverse", "-o", tmp_path / "top_a.json")
    assert json.loads((tmp_path / "top_a.json").read_text()) == {"model": "A",
                                                                 "entries": entries}

    csv_text = "index,score,layer\n" + "".join(f"{e['index']},{e['score']!r},2\n"
                                               for e in entries)
    (tmp_path / "top.csv").write_text(csv_text)
    cli("transport", "neurons", tmp_path / "top.csv", "--gauge", tmp_path / "g.json", "-o",
        tmp_path / "top_b.csv")
    assert "gauge_sign" in (tmp_path / "top_b.csv").read_text().splitlines()[0]
    cli("transport", "neurons", tmp_path / "top_b.csv", "--gauge", tmp_path / "g.json",
        "--inverse", "-o", tmp_path / "top_a.csv")
    assert (tmp_path / "top_a.csv").read_text() == csv_text

    (tmp_path / "bad.json").write_text(json.dumps([{"index": 64, "score": 1.0}]))
    res = cli("transport", "neurons", tmp_path / "bad.json", "--gauge", tmp_path / "g.json",
              "-o", tmp_path / "x.json", ok=False)
    assert res.exit_code == 2 and "width mismatch" in res.stderr
    (tmp_path / "bad.csv").write_text("neuron,score\n1,2\n")
    res = cli("transport", "neurons", tmp_path / "bad.csv", "--gauge", tmp_path / "g.json",
              "-o", tmp_path / "x.csv", ok=False)
    assert res.exit_code == 2 and "'index' column" in res.stderr
