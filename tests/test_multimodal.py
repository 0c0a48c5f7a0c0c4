"""Multimodal checkpoints: the text model is gauged, the vision tower is left as it is, and
the projector that writes image features into the residual stream is moved."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gaugefix.apply import gauge_model
from gaugefix.arch import detect_family
from gaugefix.group import SignedPerm
from gaugefix.tiny import build_tiny


def _vlm(seed: int = 0) -> torch.nn.Module:
    model = build_tiny("gemma3_vlm", seed=seed)
    with torch.no_grad():  # transformers initialises the projector to zero: no image signal
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(
            0, 0.3, generator=torch.Generator().manual_seed(seed))
    return model


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.config
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    ids[:, 4:4 + cfg.mm_tokens_per_image] = cfg.image_token_id
    size = cfg.vision_config.image_size
    px = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "pixel_values": px}


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True, use_cache=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_gemma3_image_and_text_logits_survive_the_gauge():
    model = _vlm()
    fam = detect_family(model.config)
    assert fam.name == "gemma3_vlm" and fam.allows_signs
    g = SignedPerm.random(64, seed=3, positive_fraction=0.5)
    moved = gauge_model(model, g)
    inputs = _inputs(model)
    out_a, out_b = _run(model, inputs), _run(moved, inputs)
    assert _rel(out_a.logits, out_b.logits) < 1e-5
    for ha, hb in zip(out_a.hidden_states, out_b.hidden_states, strict=True):
        assert _rel(g.apply(ha, -1), hb) < 1e-5
    # the images matter to these logits (the check can fail) ...
    blank = _run(model, {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])})
    assert _rel(out_a.logits, blank.logits) > 1e-2
    # ... and the projector is what carries them into B's chart
    unmoved = gauge_model(model, g)
    with torch.no_grad():
        unmoved.model.multi_modal_projector.mm_input_projection_weight.copy_(
            model.model.multi_modal_projector.mm_input_projection_weight)
    assert _rel(out_a.logits, _run(unmoved, inputs).logits) > 1e-2
    # the vision tower is bit for bit what it was
    sa, sb = model.state_dict(), moved.state_dict()
    tower = [k for k in sa if fam.in_tower(k)]
    assert tower and all(torch.equal(sa[k], sb[k]) for k in tower)


def test_apply_says_the_tower_is_left_as_it_is(tmp_path, cli):
    model = _vlm(seed=4)
    model.save_pretrained(tmp_path / "A")
    res = cli("apply", tmp_path / "A", tmp_path / "B", "--random", 7, "--gauge-out",
              tmp_path / "g.json")
    assert "tensors of the vision/audio tower(s) left as they are" in res.stdout
    a, b = load_file(tmp_path / "A" / "model.safetensors"), load_file(
        tmp_path / "B" / "model.safetensors")
    fam = detect_family(model.config)
    assert all(torch.equal(a[k], b[k]) for k in a if fam.in_tower(k))
    proj = next(k for k in a if k.endswith("multi_modal_projector.mm_input_projection_weight"))
    assert torch.equal(b[proj], SignedPerm.load(tmp_path / "g.json").apply(a[proj], 1))


@pytest.mark.parametrize("key", ["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
                                 "model.vision_tower.head.attention.in_proj_weight"])
def test_tower_tensors_never_take_a_text_rule(key):
    fam = detect_family({"model_type": "gemma3"})
    assert fam.in_tower(key) and fam.op_for(key).residual_axis is None


def test_a_vlm_pair_is_matched_and_inspected_through_its_text_model(tmp_path, cli):
    model = _vlm(seed=5)
    model.save_pretrained(tmp_path / "A")
    cli("apply", tmp_path / "A", tmp_path / "B", "--random", 9, "--gauge-out",
        tmp_path / "true.json")
    cli("match", tmp_path / "A", tmp_path / "B", "--source", "weights", "-o",
        tmp_path / "est.json")
    assert SignedPerm.load(tmp_path / "est.json") == SignedPerm.load(tmp_path / "true.json")
    res = cli("inspect", tmp_path / "A", "--json")
    assert '"family": "gemma3_vlm"' in res.stdout and '"hidden_size": 64' in res.stdout
