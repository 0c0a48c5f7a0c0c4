"""Gemma Scope, crosscoders, circuit-tracer transcoders and TransformerLens processing.

Every forward pass below is written from the format's own spec in plain torch;
equivariance means: the moved object on gauge-moved inputs gives the gauge-moved outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gaugefix.errors import GaugefixError
from gaugefix.group import SignedPerm
from gaugefix.transport import transport

D, F = 64, 96
G = SignedPerm.random(D, seed=5, positive_fraction=0.5)
G2 = SignedPerm.random(D, seed=6, positive_fraction=0.5)


def _t(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _cli_error(cli, tmp_path: Path, args: list[object], *messages: str) -> str:
    before = _listing(tmp_path)
    res = cli(*args, ok=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for m in messages:
        assert m in lines[0], lines[0]
    assert _listing(tmp_path) == before  # nothing written, no temporary left
    return lines[0]


@pytest.fixture
def gauge_file(tmp_path: Path) -> Path:
    G.save(tmp_path / "g.json")
    return tmp_path / "g.json"


def _jumprelu(pre: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.relu(pre) * (pre > theta)


# ---------------------------------------------------------------------------- Gemma Scope 1
def _gemmascope_arrays(d: int = D) -> dict[str, np.ndarray]:
    return {"W_enc": _t(d, F, seed=1).numpy(), "W_dec": _t(F, d, seed=2).numpy(),
            "b_enc": _t(F, seed=3).numpy(), "b_dec": _t(d, seed=4).numpy(),
            "threshold": (_t(F, seed=5).abs() * 0.1).numpy()}


def _gemmascope_folder(root: Path, arrays: dict[str, np.ndarray], compressed: bool = False,
                       sub: str = "gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_50"
                       ) -> Path:
    folder = root / sub
    folder.mkdir(parents=True)
    (np.savez_compressed if compressed else np.savez)(folder / "params.npz", **arrays)
    return folder


def _gs_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    acts = _jumprelu(x @ p["W_enc"] + p["b_enc"], p["threshold"])
    return acts @ p["W_dec"] + p["b_dec"]


def _npz(path: Path) -> dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


@pytest.mark.parametrize("compressed", [False, True])
def test_gemmascope_npz_equivariant_and_bytes_restored(tmp_path, cli, gauge_file, compressed):
    src = _gemmascope_folder(tmp_path, _gemmascope_arrays(), compressed)
    (src / "README").write_text("side file")
    cli("transport", "gemmascope", src, "--gauge", gauge_file, "-o", tmp_path / "B")
    assert sorted(p.name for p in (tmp_path / "B").iterdir()) == ["README", "gaugefix.json",
                                                                   "params.npz"]
    assert json.loads((tmp_path / "B" / "gaugefix.json").read_text())["direction"] == "A->B"
    a, b = _npz(src / "params.npz"), _npz(tmp_path / "B" / "params.npz")
    assert list(a) == list(b)  # same arrays, same order
    x = _t(16, D, seed=9)
    assert torch.allclose(_gs_forward(b, G.apply(x, 1)), G.apply(_gs_forward(a, x), 1),
                          atol=1e-5)
    cli("transport", "gemmascope", tmp_path / "B", "--gauge", gauge_file, "--inverse", "-o",
        tmp_path / "A2")
    # the file, byte for byte (zip entries, .npy headers and values)
    assert (tmp_path / "A2" / "params.npz").read_bytes() == (src / "params.npz").read_bytes()


def test_saelens_loads_transported_gemmascope(tmp_path, monkeypatch, gauge_file, cli):
    """SAELens' own Gemma Scope loader (params.npz → JumpReLUSAE), pointed at the local tree."""
    import sae_lens.loading.pretrained_sae_loaders as loaders
    from sae_lens import SAE

    arrays = _gemmascope_arrays()
    arrays["scaling_factor"] = np.ones(F, np.float32)  # SAELens drops it when all ones
    src = _gemmascope_folder(tmp_path / "A", arrays)
    sub = "layer_3/width_16k/average_l0_50"
    dst = tmp_path / "B" / "gemma-scope-2b-pt-res" / sub
    dst.parent.mkdir(parents=True)
    cli("transport", "gemmascope", src, "--gauge", gauge_file, "-o", dst)

    def load(root: Path) -> SAE:
        def local(repo_id: str, filename: str, subfolder: str = "", **_: object) -> str:
            return str(root / repo_id.split("/")[1] / subfolder / filename)

        monkeypatch.setattr(loaders, "hf_hub_download", local)

        def converter(path, device, cfg_overrides):
            cfg, state, _ = loaders.gemma_2_sae_huggingface_loader(
                "google/gemma-scope-2b-pt-res", sub, device,
                cfg_overrides={"d_in": D, "d_sae": F})
            return cfg, state

        return SAE.load_from_disk(str(root), converter=converter)

    orig, moved = load(tmp_path / "A"), load(tmp_path / "B")
    x = _t(16, D, seed=10)
    with torch.no_grad():
        assert torch.allclose(orig(x), _gs_forward(_npz(src / "params.npz"), x), atol=1e-5)
        assert torch.allclose(moved(G.apply(x, 1)), G.apply(orig(x), 1), atol=1e-5)


def test_gemmascope_bad_inputs(tmp_path, cli, gauge_file):
    arrays = _gemmascope_arrays()
    del arrays["threshold"]
    arrays["W_extra"] = np.zeros(3, np.float32)
    arrays["log_threshold"] = np.zeros(F, np.float32)
    src = _gemmascope_folder(tmp_path, arrays, sub="bad")
    _cli_error(cli, tmp_path, ["transport", "gemmascope", src, "--gauge", gauge_file, "-o",
                               tmp_path / "o"],
               "2 tensor name(s) match no rule: W_extra, log_threshold",
               "required tensor(s) missing: threshold")
    narrow = _gemmascope_folder(tmp_path, _gemmascope_arrays(d=32), sub="narrow")
    _cli_error(cli, tmp_path, ["transport", "gemmascope", narrow, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "width mismatch", "W_enc")
    att = _gemmascope_folder(tmp_path, _gemmascope_arrays(),
                             sub="gemma-scope-27b-pt-att/layer_3/width_16k/average_l0_50")
    _cli_error(cli, tmp_path, ["transport", "gemmascope", att, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "head space")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    objs = {**_gemmascope_arrays(), "threshold": np.array([{"x": 1}], dtype=object)}
    np.savez(pickled / "params.npz", **objs)
    _cli_error(cli, tmp_path, ["transport", "gemmascope", pickled, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "not numeric")
    (tmp_path / "empty").mkdir()
    _cli_error(cli, tmp_path, ["transport", "gemmascope", tmp_path / "empty", "--gauge",
                               gauge_file, "-o", tmp_path / "o"], "unknown layout")


# ---------------------------------------------------------------------------- Gemma Scope 2
def _v2_single(skip: bool) -> dict[str, torch.Tensor]:
    t = {"w_enc": _t(D, F, seed=11), "w_dec": _t(F, D, seed=12), "b_enc": _t(F, seed=13),
         "b_dec": _t(D, seed=14), "threshold": _t(F, seed=15).abs() * 0.1}
    if skip:
        t["affine_skip_connection"] = _t(D, D, seed=16)
    return t


def _v2_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    y = _jumprelu(x @ p["w_enc"] + p["b_enc"], p["threshold"]) @ p["w_dec"] + p["b_dec"]
    return y + x @ p["affine_skip_connection"] if "affine_skip_connection" in p else y


def test_gemmascope2_transcoder_and_saelens_loads_it(tmp_path, cli, gauge_file, monkeypatch):
    import sae_lens.loading.pretrained_sae_loaders as loaders
    from sae_lens import SAE

    sub = "transcoder/layer_5_width_16k_l0_small_affine"
    src = tmp_path / "A" / "gemma-scope-2-1b-pt" / sub
    src.mkdir(parents=True)
    t = _v2_single(skip=True)
    save_file(t, str(src / "params.safetensors"))
    cfg = {"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt", "affine_connection": True,
           "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
           "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output"}
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "B" / "gemma-scope-2-1b-pt" / sub
    dst.parent.mkdir(parents=True)
    cli("transport", "gemmascope", src, "--gauge", gauge_file, "-o", dst)
    m = load_file(dst / "params.safetensors")
    x = _t(16, D, seed=17)
    assert torch.allclose(_v2_forward(m, G.apply(x, 1)), G.apply(_v2_forward(t, x), 1),
                          atol=1e-5)

    def load(root: Path) -> SAE:
        def local(repo_id: str, filename: str, subfolder: str = "", **_: object) -> str:
            return str(root / repo_id.split("/")[1] / subfolder / filename)

        def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
            return {k: list(v.shape) for k, v in load_file(local(repo_id, filename)).items()}

        monkeypatch.setattr(loaders, "hf_hub_download", local)
        monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)

        def converter(path, device, cfg_overrides):
            cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(
                "google/gemma-scope-2-1b-pt", sub, device)
            return cfg, state

        return SAE.load_from_disk(str(root), converter=converter)

    orig, moved = load(tmp_path / "A"), load(tmp_path / "B")
    with torch.no_grad():  # SAELens' JumpReLU skip transcoder (relu·step) = the spec's
        assert torch.allclose(orig(x), _v2_forward(t, x), atol=1e-5)
        assert torch.allclose(moved(G.apply(x, 1)), G.apply(orig(x), 1), atol=1e-5)

    cfg["hf_hook_point_in"] = "model.layers.5.self_attn.o_proj.input"
    (src / "config.json").write_text(json.dumps(cfg))
    _cli_error(cli, tmp_path, ["transport", "gemmascope", src, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "not in residual coordinates")


def test_gemmascope2_multilayer_clt(tmp_path, cli, gauge_file):
    """params_layer_{i}.safetensors: layer i's latents decode into every layer (w_dec
    [F_l, n, d]); the output at layer j is Σ_i f_i @ w_dec_i[:, j] + b_dec_j."""
    n, fl = 3, 24
    src = tmp_path / "clt" / "width_262k_l0_big_affine"
    src.mkdir(parents=True)
    layers = [{"w_enc": _t(D, fl, seed=20 + i), "w_dec": _t(fl, n, D, seed=30 + i),
               "b_enc": _t(fl, seed=40 + i), "b_dec": _t(D, seed=50 + i),
               "threshold": _t(fl, seed=60 + i).abs() * 0.1,
               "affine_skip_connection": _t(D, D, seed=70 + i)} for i in range(n)]
    for i, t in enumerate(layers):
        save_file(t, str(src / f"params_layer_{i}.safetensors"))

    def forward(ps, xs):
        fs = [_jumprelu(x @ p["w_enc"] + p["b_enc"], p["threshold"])
              for p, x in zip(ps, xs, strict=True)]
        return [sum(f @ p["w_dec"][:, j] for f, p in zip(fs, ps, strict=True)) + ps[j]["b_dec"]
                + xs[j] @ ps[j]["affine_skip_connection"] for j in range(n)]

    cli("transport", "gemmascope", src, "--gauge", gauge_file, "-o", tmp_path / "B")
    moved = [load_file(tmp_path / "B" / f"params_layer_{i}.safetensors") for i in range(n)]
    xs = [_t(8, D, seed=80 + i) for i in range(n)]
    for got, want in zip(forward(moved, [G.apply(x, 1) for x in xs]), forward(layers, xs),
                         strict=True):
        assert torch.allclose(got, G.apply(want, 1), atol=1e-4)
    cli("transport", "gemmascope", tmp_path / "B", "--gauge", gauge_file, "--inverse", "-o",
        tmp_path / "A2")
    for i, t in enumerate(layers):
        back = load_file(tmp_path / "A2" / f"params_layer_{i}.safetensors")
        assert all(torch.equal(back[k], v) for k, v in t.items())


# ---------------------------------------------------------------------------- crosscoders
def _ck_state(m: int = 2) -> dict[str, torch.Tensor]:
    return {"W_enc": _t(m, D, F, seed=90), "W_dec": _t(F, m, D, seed=91),
            "b_enc": _t(F, seed=92), "b_dec": _t(m, D, seed=93)}


def _ck_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [batch, m, d] -> reconstruction [batch, m, d] (ckkissane's encode / decode)."""
    f = torch.relu(torch.einsum("bmd,mdf->bf", x, p["W_enc"]) + p["b_enc"])
    return torch.einsum("bf,fmd->bmd", f, p["W_dec"]) + p["b_dec"]


def _per_slot(x: torch.Tensor, gauges, axis: int = 1) -> torch.Tensor:
    return torch.stack([x.select(axis, s) if g is None else g.apply(x.select(axis, s), -1)
                        for s, g in enumerate(gauges)], axis)


def test_crosscoder_ckkissane_one_gauge_per_model(tmp_path, cli, gauge_file):
    src = tmp_path / "blocks.14.hook_resid_pre"
    src.mkdir()
    t = _ck_state()
    torch.save(t, src / "cc_weights.pt")
    (src / "cfg.json").write_text(json.dumps({"d_in": D, "dict_size": F}))
    x = _t(8, 2, D, seed=94)
    # base model A stays, chat model B moved by G: per-slot gauges through the Python API
    info = transport("crosscoder", src, tmp_path / "B", [None, G], gauge_file="g.json")
    assert info == {"layout": "ckkissane", "slots": 2, "moved slots": 1, "tensors": 4}
    m = torch.load(tmp_path / "B" / "cc_weights.pt", weights_only=True)
    assert torch.equal(m["W_enc"][0], t["W_enc"][0])  # slot 0 untouched
    assert torch.allclose(_ck_forward(m, _per_slot(x, [None, G])),
                          _per_slot(_ck_forward(t, x), [None, G]), atol=1e-5)
    transport("crosscoder", tmp_path / "B", tmp_path / "A2", [None, G], inverse=True)
    back = torch.load(tmp_path / "A2" / "cc_weights.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in t.items())
    # the CLI moves every slot by its one gauge (two models moved alike, or two layers)
    cli("transport", "crosscoder", src, "--gauge", gauge_file, "-o", tmp_path / "C")
    c = torch.load(tmp_path / "C" / "cc_weights.pt", weights_only=True)
    assert torch.allclose(_ck_forward(c, G.apply(x, 2)), G.apply(_ck_forward(t, x), 2),
                          atol=1e-5)
    assert (tmp_path / "C" / "cfg.json").read_text() == (src / "cfg.json").read_text()
    with pytest.raises(GaugefixError, match="has 2 slots, got 3 gauges"):
        transport("crosscoder", src, tmp_path / "D", [G, None, G])
    with pytest.raises(GaugefixError, match="sae takes one gauge"):
        transport("sae", src, tmp_path / "D", [G, G])


def _dl_state(m: int = 2, prefix: str = "") -> dict[str, torch.Tensor]:
    t = {"encoder.weight": _t(m, D, F, seed=100), "encoder.bias": _t(F, seed=101),
         "decoder.weight": _t(m, F, D, seed=102), "decoder.bias": _t(m, D, seed=103),
         "activation_mean": _t(m, D, seed=104), "activation_std": _t(m, D, seed=105).abs() + 0.5,
         "activation_global_scale": torch.tensor([1.3, 0.7]), "k": torch.tensor(8)}
    return {prefix + k: v for k, v in t.items()}


def _dl_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """dictionary_learning CrossCoder with normalisation (x − mean)/std, then undone."""
    xn = (x - p["activation_mean"]) / p["activation_std"]
    f = torch.relu(torch.einsum("bmd,mdf->bf", xn, p["encoder.weight"]) + p["encoder.bias"])
    y = torch.einsum("bf,mfd->bmd", f, p["decoder.weight"]) + p["decoder.bias"]
    return y * p["activation_std"] + p["activation_mean"]


def test_crosscoder_dictionary_learning(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    t = _dl_state()
    save_file(t, str(hub / "model.safetensors"))
    (hub / "config.json").write_text("{}")
    x = _t(8, 2, D, seed=106)
    transport("crosscoder", hub, tmp_path / "B", [G, G2])
    m = load_file(tmp_path / "B" / "model.safetensors")
    assert torch.allclose(_dl_forward(m, _per_slot(x, [G, G2])),
                          _per_slot(_dl_forward(t, x), [G, G2]), atol=1e-4)
    assert (m["activation_std"] > 0).all()  # a scale: gathered, never sign-flipped
    transport("crosscoder", tmp_path / "B", tmp_path / "A2", [G, G2], inverse=True)
    back = load_file(tmp_path / "A2" / "model.safetensors")
    assert all(torch.equal(back[k], v) for k, v in t.items())
    # a torch.compile'd state dict in a bare .pt file keeps its names
    torch.save(_dl_state(prefix="_orig_mod."), tmp_path / "cc.pt")
    transport("crosscoder", tmp_path / "cc.pt", tmp_path / "cc_b.pt", G)
    pb = torch.load(tmp_path / "cc_b.pt", weights_only=True)
    assert torch.equal(pb["_orig_mod.decoder.bias"], G.apply(t["decoder.bias"], 1))


def test_crosscoder_bad_inputs(tmp_path, cli, gauge_file):
    src = tmp_path / "cc"
    src.mkdir()
    torch.save({**_ck_state(), "W_gate": torch.zeros(2), "mystery": torch.zeros(1)},
               src / "cc_weights.pt")
    _cli_error(cli, tmp_path, ["transport", "crosscoder", src, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "2 tensor name(s) match no rule: W_gate, mystery")
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    torch.save({"W_enc": torch.zeros(2, 32, F), "W_dec": torch.zeros(F, 2, 32),
                "b_enc": torch.zeros(F), "b_dec": torch.zeros(2, 32)}, narrow / "cc_weights.pt")
    _cli_error(cli, tmp_path, ["transport", "crosscoder", narrow, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "width mismatch")


# ---------------------------------------------------------------------------- circuit-tracer
def _clt(root: Path, n: int = 3, fl: int = 24) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    root.mkdir()
    layers = []
    for i in range(n):
        enc = {f"W_enc_{i}": _t(fl, D, seed=110 + i), f"b_enc_{i}": _t(fl, seed=120 + i),
               f"b_dec_{i}": _t(D, seed=130 + i),
               f"threshold_{i}": _t(fl, seed=140 + i).abs() * 0.1}
        dec = {f"W_dec_{i}": _t(fl, n - i, D, seed=150 + i)}
        save_file(enc, str(root / f"W_enc_{i}.safetensors"))
        save_file(dec, str(root / f"W_dec_{i}.safetensors"))
        layers.append({**enc, **dec})
    (root / "config.yaml").write_text("model_kind: cross_layer_transcoder\n"
                                      "feature_input_hook: hook_resid_mid\n"
                                      "feature_output_hook: hook_mlp_out\n")
    return root, layers


def _clt_forward(ps: list[dict[str, torch.Tensor]], xs: list[torch.Tensor]
                 ) -> list[torch.Tensor]:
    """circuit-tracer: f_i = JumpReLU(F.linear(x_i, W_enc_i, b_enc_i)) (x·(x > θ)); the
    output at layer j is Σ_{i ≤ j} f_i @ W_dec_i[:, j − i] + b_dec_j."""
    fs = []
    for i, (p, x) in enumerate(zip(ps, xs, strict=True)):
        pre = torch.nn.functional.linear(x, p[f"W_enc_{i}"], p[f"b_enc_{i}"])
        fs.append(pre * (pre > p[f"threshold_{i}"]))
    return [sum(fs[i] @ ps[i][f"W_dec_{i}"][:, j - i] for i in range(j + 1))
            + ps[j][f"b_dec_{j}"] for j in range(len(ps))]


def _load_clt(root: Path, n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [{**load_file(root / f"W_enc_{i}.safetensors"),
             **load_file(root / f"W_dec_{i}.safetensors")} for i in range(n)]


def test_circuit_tracer_clt(tmp_path, cli, gauge_file):
    src, layers = _clt(tmp_path / "clt")
    cli("transport", "clt", src, "--gauge", gauge_file, "-o", tmp_path / "B")
    xs = [_t(8, D, seed=160 + i) for i in range(3)]
    got = _clt_forward(_load_clt(tmp_path / "B"), [G.apply(x, 1) for x in xs])
    for g, w in zip(got, _clt_forward(layers, xs),
                         strict=True):
        assert torch.allclose(g, G.apply(w, 1), atol=1e-4)
    cli("transport", "clt", tmp_path / "B", "--gauge", gauge_file, "--inverse", "-o",
        tmp_path / "A2")
    for back, t in zip(_load_clt(tmp_path / "A2"), layers, strict=True):
        assert all(torch.equal(back[k], v) for k, v in t.items())
    assert (tmp_path / "A2" / "config.yaml").read_text() == (src / "config.yaml").read_text()


def test_circuit_tracer_transcoder_set(tmp_path, cli, gauge_file):
    src = tmp_path / "plt"
    src.mkdir()
    ts = [{"W_enc": _t(F, D, seed=170 + i), "W_dec": _t(F, D, seed=175 + i),
           "b_enc": _t(F, seed=180 + i), "b_dec": _t(D, seed=185 + i),
           "activation_function.threshold": _t(F, seed=190 + i).abs() * 0.1,
           "W_skip": _t(D, D, seed=195 + i)} for i in range(2)]
    for i, t in enumerate(ts):
        save_file(t, str(src / f"layer_{i}.safetensors"))
    (src / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: "
                                     "mlp.hook_in\nfeature_output_hook: mlp.hook_out\n")

    def fwd(p, x):
        pre = torch.nn.functional.linear(x, p["W_enc"], p["b_enc"])
        f = pre * (pre > p["activation_function.threshold"])
        return f @ p["W_dec"] + p["b_dec"] + x @ p["W_skip"].T

    cli("transport", "clt", src, "--gauge", gauge_file, "-o", tmp_path / "B")
    x = _t(8, D, seed=199)
    for i, t in enumerate(ts):
        m = load_file(tmp_path / "B" / f"layer_{i}.safetensors")
        assert torch.allclose(fwd(m, G.apply(x, 1)), G.apply(fwd(t, x), 1), atol=1e-5)


def test_circuit_tracer_bad_inputs(tmp_path, cli, gauge_file):
    src, _ = _clt(tmp_path / "clt")
    save_file({"W_dec_1": torch.zeros(24, 3, D)}, str(src / "W_dec_1.safetensors"))
    _cli_error(cli, tmp_path, ["transport", "clt", src, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "expected [F, 2, 64]")
    save_file({"W_dec_1": torch.zeros(24, 2, 32)}, str(src / "W_dec_1.safetensors"))
    _cli_error(cli, tmp_path, ["transport", "clt", src, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "width mismatch")
    save_file({"W_enc_1": torch.zeros(24, D), "b_dec_1": torch.zeros(D),
               "W_skip_1": torch.zeros(D, D), "junk": torch.zeros(1)},
              str(src / "W_enc_1.safetensors"))
    _cli_error(cli, tmp_path, ["transport", "clt", src, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "match no rule: W_skip_1, junk",
               "required tensor(s) missing: b_enc_1")
    src2, _ = _clt(tmp_path / "clt2")
    (src2 / "W_dec_2.safetensors").unlink()
    _cli_error(cli, tmp_path, ["transport", "clt", src2, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "W_dec files for [0, 1]")
    src3, _ = _clt(tmp_path / "clt3")
    (src3 / "config.yaml").write_text("feature_input_hook: mlp.hook_post\n")
    _cli_error(cli, tmp_path, ["transport", "clt", src3, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "not in residual coordinates")


# ---------------------------------------------------------------------------- TransformerLens
def _centre(w: torch.Tensor, axis: int) -> torch.Tensor:
    """TransformerLens' center_writing_weights: subtract the mean over d."""
    return w - w.mean(axis, keepdim=True)


def test_centring_commutes_with_permutations_and_a_global_sign_only():
    w = _t(F, D, seed=200)  # a writing weight, [F, d] (like W_out)
    for g in (G.unsigned(), SignedPerm.random(D, seed=1, kind="global"),
              SignedPerm(G.perm, -np.ones(D, dtype=np.int64))):
        assert torch.allclose(_centre(g.apply(w, 1), 1), g.apply(_centre(w, 1), 1), atol=1e-6)
    assert G.global_sign is None
    assert not torch.allclose(_centre(G.apply(w, 1), 1), G.apply(_centre(w, 1), 1), atol=1e-3)


def test_fold_ln_commutes_with_the_gauge():
    """Folding the gain w into a reader W (diag(w)·W): the gain moves unsigned, the reader
    signed, so folding then moving = moving then folding; the residual (and the gain-free
    hook_normalized x/rms) are the same with and without folding, and the gained norm output
    moves by the signed rule like x."""
    gain, reader, x = _t(D, seed=201) + 1, _t(D, F, seed=202), _t(8, D, seed=203)
    fold = lambda g_, r: g_[:, None] * r  # noqa: E731
    assert torch.allclose(fold(G.apply(gain, 0, signed=False), G.apply(reader, 0)),
                          G.apply(fold(gain, reader), 0), atol=1e-6)
    normed = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    xb = G.apply(x, 1)
    normed_b = xb / xb.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(normed_b, G.apply(normed, 1), atol=1e-6)  # rms is invariant
    assert torch.allclose(normed_b * G.apply(gain, 0, signed=False), G.apply(normed * gain, 1),
                          atol=1e-6)
    # and the folded reader on the moved input reads what the original read
    assert torch.allclose(normed_b @ G.apply(fold(gain, reader), 0), normed @ fold(gain, reader),
                          atol=1e-5)


def test_tl_processing_read_from_the_cfg():
    from gaugefix.transport.tlens import check_tl_processing, tl_processing

    def cfg(**kwargs):
        return {"metadata": {"model_class_name": "HookedTransformer",
                             "model_from_pretrained_kwargs": kwargs}}

    assert tl_processing(cfg()) == {"fold_ln": True, "center_writing_weights": True}
    assert tl_processing(cfg(center_writing_weights=False)) == {
        "fold_ln": True, "center_writing_weights": False}
    assert tl_processing({"model_class_name": "HookedTransformer",  # pre-6.0, flat
                          "model_from_pretrained_kwargs": {"fold_ln": False}}) == {
        "fold_ln": False, "center_writing_weights": True}
    assert tl_processing({"metadata": {"model_class_name": "AutoModelForCausalLM",
                                       "model_from_pretrained_kwargs": {}}}) is None
    assert tl_processing({"metadata": {}}) is None  # not recorded: nothing to say
    with pytest.raises(GaugefixError, match="center_writing_weights=True"):
        check_tl_processing(cfg(), G, "sae")
    check_tl_processing(cfg(), G.unsigned(), "sae")  # permutations: fine
    check_tl_processing(cfg(), SignedPerm.random(D, seed=2, kind="global"), "sae")
    check_tl_processing(cfg(center_writing_weights=False, fold_ln=True), G, "sae")
    with pytest.raises(GaugefixError, match="must be true or false"):
        tl_processing(cfg(center_writing_weights="yes"))


def test_sae_on_centred_tl_model_refused_via_cli(tmp_path, cli, gauge_file):
    from gaugefix.testing import save_saelens

    sae = {"W_enc": _t(D, F, seed=210), "b_enc": torch.zeros(F), "W_dec": _t(F, D, seed=211),
           "b_dec": torch.zeros(D)}
    src = save_saelens(tmp_path / "sae", sae, hook_name="blocks.3.hook_resid_post")
    cfg = json.loads((src / "cfg.json").read_text())
    cfg["metadata"].update(model_class_name="HookedTransformer",
                           model_from_pretrained_kwargs={"center_writing_weights": True})
    (src / "cfg.json").write_text(json.dumps(cfg))
    _cli_error(cli, tmp_path, ["transport", "sae", src, "--gauge", gauge_file, "-o",
                               tmp_path / "o"], "center_writing_weights=True")
    G.unsigned().save(tmp_path / "perm.json")
    cli("transport", "sae", src, "--gauge", tmp_path / "perm.json", "-o", tmp_path / "ok")
