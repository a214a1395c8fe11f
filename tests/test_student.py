"""LoRA student on the real (small) SVD UNet: starts equal to the teacher, trains only LoRA
(+ unfrozen layers), merges into a plain UNet that round-trips through save/from_pretrained."""

from pathlib import Path

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from osv.models import build_small_unet
from osv.params import load_params
from osv.student import (
    load_trainable_state_dict,
    make_student,
    merge_student,
    trainable_state_dict,
    unfreeze,
)

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")


def unet_inputs(seed=0, b=1, t=3, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, 8, h, w, generator=g), torch.full((b,), 0.3),
            torch.randn(b, 1, 64, generator=g), torch.tensor([[6.0, 127.0, 0.02]]).expand(b, 3))


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def student():
    s = PARAMS["student"]
    return make_student(build_small_unet(seed=3), s["lora_rank"], s["lora_targets"])


def perturb_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_student_starts_equal_to_teacher_and_stays_a_unet():
    teacher = build_small_unet(seed=3)
    model = student()
    assert isinstance(model, UNetSpatioTemporalConditionModel)
    x = unet_inputs()
    assert torch.equal(run(teacher, x), run(model, x))


def test_params_defaults_match_real_module_names():
    model = student()
    names = [n for n, _ in model.named_parameters()]
    for target in PARAMS["student"]["lora_targets"]:
        assert any(f".{target}.lora_A." in n for n in names), target
    # both spatial and temporal attention get LoRA
    assert any("temporal_transformer_blocks" in n and "lora_A" in n for n in names)
    hit = unfreeze(model, PARAMS["student"]["unfreeze"])
    assert hit and all("temporal_transformer_blocks" in n for n in hit)


def test_only_lora_then_unfrozen_are_trainable():
    model = student()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert set(trainable_state_dict(model)) == trainable
    hit = unfreeze(model, ["temporal_transformer_blocks"])
    now = {n for n, p in model.named_parameters() if p.requires_grad}
    assert now == trainable | set(hit)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if "lora_" not in n and "temporal_transformer_blocks" not in n)
    # a backward pass gives gradients to exactly those
    model(*unet_inputs()).sample.square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= now and any(".lora_B." in n for n in with_grad)
    with pytest.raises(ValueError, match="match no parameter"):
        unfreeze(model, ["no_such_block"])


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="lora_targets"):
        make_student(build_small_unet(), 4, ["to_qkv"])


def test_trainable_state_dict_round_trip():
    a = student()
    unfreeze(a, PARAMS["student"]["unfreeze"])
    perturb_lora(a)
    b = student()
    unfreeze(b, PARAMS["student"]["unfreeze"])
    load_trainable_state_dict(b, trainable_state_dict(a))
    x = unet_inputs()
    assert torch.equal(run(a, x), run(b, x))
    c = student()  # LoRA only: the unfrozen tensors are extra but known, fine non-strict
    load_trainable_state_dict(c, trainable_state_dict(student()))
    with pytest.raises(KeyError, match="lacks trainable"):
        load_trainable_state_dict(b, trainable_state_dict(student()))


def test_merge_save_reload_reproduces_student(tmp_path):
    model = student()
    unfreeze(model, PARAMS["student"]["unfreeze"])
    perturb_lora(model)
    with torch.no_grad():  # also move an unfrozen base weight, as stage 2 does
        next(p for n, p in model.named_parameters() if "temporal_transformer_blocks" in n and "base_layer" in n).add_(0.05)
    x = unet_inputs(seed=5, t=4, h=8, w=16)
    expected = run(model, x)
    assert not torch.allclose(expected, run(build_small_unet(seed=3), x), atol=1e-4)
    merged = merge_student(model)
    assert type(merged) is UNetSpatioTemporalConditionModel
    assert not any("lora" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "unet")
    reloaded = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(run(reloaded, x), expected, atol=1e-5, rtol=1e-4)
    # the student itself is untouched by merging
    torch.testing.assert_close(run(model, x), expected, atol=0, rtol=0)
