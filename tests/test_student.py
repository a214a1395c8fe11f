"""LoRA student on the real (small) SVD UNet: starts equal to the teacher, trains only LoRA
(+ unfrozen layers), merges into a plain UNet that round-trips through save/from_pretrained."""

from pathlib import Path

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from osv.models import build_small_unet
from osv.params import load_params
from osv.student import (
    enable_gradient_checkpointing,
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


# ----------------------------------------------------------------------------- gradient checkpointing


def grads_of(model, x, dtype=None):
    """Loss, input gradient and parameter gradients of one forward + backward."""
    model.zero_grad(set_to_none=True)
    sample = x[0].clone().requires_grad_(True)
    out = model(sample, *x[1:]).sample
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), sample.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def stage2_student():
    model = student()
    unfreeze(model, PARAMS["student"]["unfreeze"])
    perturb_lora(model)
    return model.train()


def test_checkpointing_covers_temporal_blocks_with_identical_gradients():
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    model, x = stage2_student(), unet_inputs(seed=2, t=3, h=8, w=8)
    keys = list(model.state_dict())
    before = run(model, x)
    plain = grads_of(model, x)
    regions = enable_gradient_checkpointing(model)
    transformers = [n for n, m in model.named_modules() if isinstance(m, TransformerSpatioTemporalModel)]
    assert transformers and set(transformers) <= set(regions)
    assert "mid_block.resnets.0" in regions and any("upsamplers" in n for n in regions)
    assert list(model.state_dict()) == keys  # same parameters and names (peft LoRA layers inside)
    ckpt = grads_of(model, x)
    assert set(ckpt[2]) == set(plain[2]) and any("temporal_transformer_blocks" in n for n in ckpt[2])
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(ckpt[1], plain[1], rtol=1e-6, atol=1e-7)
    for name, grad in plain[2].items():
        torch.testing.assert_close(ckpt[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(run(model, x), before)  # inference through the swapped modules is the plain forward


def test_checkpointing_keeps_less_for_backward_than_diffusers_alone():
    from osv.memory import checkpoint_module, saved_tensor_bytes

    x = unet_inputs(seed=2, t=4, h=8, w=8)

    def saved(model):
        return saved_tensor_bytes(lambda: model(*x).sample.square().mean(), exclude=[model]).bytes

    model = stage2_student()
    none = saved(model)
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_module)  # diffusers' coverage
    partial = saved(model)
    enable_gradient_checkpointing(model)
    full = saved(model)
    assert full < partial < none
    assert full < 0.6 * partial, (none, partial, full)
    model.disable_gradient_checkpointing()  # diffusers' switch turns every region off
    assert saved(model) == none
    with torch.no_grad():
        assert saved(model) == 0


def test_saved_tensor_bytes_counts_distinct_storages():
    from osv.memory import checkpoint, saved_tensor_bytes

    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    nbytes = 32 * 64 * 4

    def two_uses(x):
        h = x @ w  # saves x for w's gradient (and w when x needs one)
        return (h.exp() * h.exp()).sum()  # two exp outputs, saved by exp and again by the product

    r = saved_tensor_bytes(lambda: two_uses(x), exclude=[w])
    assert r.bytes == 3 * nbytes and r.result.requires_grad
    x_grad = x.clone().requires_grad_(True)
    assert saved_tensor_bytes(lambda: two_uses(x_grad), exclude=[w]).bytes == 3 * nbytes
    assert saved_tensor_bytes(lambda: two_uses(x_grad)).bytes == 3 * nbytes + w.numel() * 4

    def ckpt():
        return checkpoint(lambda a: (a @ w).exp().exp().sum(), x)

    r = saved_tensor_bytes(ckpt, exclude=[w], regions=True)
    assert r.bytes == nbytes  # only the region's input is held
    assert r.largest_region == 2 * nbytes  # what recomputing it saves: the two exp outputs (x is counted)
    assert saved_tensor_bytes(ckpt, exclude=[w]).largest_region == 0
