"""The LoRA student (method.md §3-4): the teacher UNet plus a peft LoRA adapter.

Stage 1 trains the LoRA only (full fine-tuning collapses to static videos);
stage 2 also trains "specific layers", given as module-name patterns
(params `student.unfreeze`, default the temporal transformer blocks).

The adapter is injected in place with `peft.inject_adapter_in_model`, so the
student stays a diffusers `UNetSpatioTemporalConditionModel` that accepts the
same call as the teacher. LoRA B starts at zero: the student equals the teacher.

`enable_gradient_checkpointing` (train.grad_checkpointing) extends diffusers' checkpointing of the
SVD UNet to the temporal blocks it skips (osv.memory).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

ADAPTER = "default"


def make_student(unet: torch.nn.Module, rank: int, targets: Iterable[str], alpha: float | None = None):
    """Add a LoRA adapter (rank, alpha = rank unless given) on `targets`; freeze everything else.

    `targets` are peft target names: a module matches when its name ends with one
    (`to_q` matches every `...attn1.to_q` and `...attn2.to_q`).
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(targets)
    if rank < 1:
        raise ValueError(f"student.lora_rank must be >= 1, got {rank}")
    names = [n for n, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"student.lora_targets {missing} match no module of {type(unet).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        lora_dropout=0.0, init_lora_weights=True)  # True: B = 0, A Kaiming
    unet = inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    for name, p in unet.named_parameters():
        p.requires_grad_(is_lora_name(name))
    return unet


def enable_gradient_checkpointing(unet: torch.nn.Module) -> list[str]:
    """Gradient checkpointing of the whole SVD UNet; returns the modules made checkpoint regions here.

    diffusers (0.42) `enable_gradient_checkpointing` checkpoints every SpatioTemporalResBlock of the
    down and up blocks and of the mid block but its first, and inside each
    TransformerSpatioTemporalModel only the spatial BasicTransformerBlocks. It skips the
    temporal_transformer_blocks (attention over frames and a 4x GEGLU feed-forward on every token),
    norm / proj_in / proj_out and the time mixer, the mid block's first resnet and the
    Upsample2D convolutions (input 4x their block's output). Here each TransformerSpatioTemporalModel
    becomes one region (spatial and temporal blocks together; the spatial blocks' own checkpoint
    becomes a plain call, so nothing is recomputed twice), and so do the mid block's first resnet
    and each upsampler. All regions are non-reentrant torch.utils.checkpoint (osv.memory.checkpoint);
    gradients are those of the plain forward. `unet.disable_gradient_checkpointing()` turns all off.
    """
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
    from diffusers.models.unets.unet_3d_blocks import UNetMidBlockSpatioTemporal
    from diffusers.models.upsampling import Upsample2D

    from osv.memory import checkpoint_module, checkpoint_whole

    regions = []
    for name, module in unet.named_modules():
        if isinstance(module, TransformerSpatioTemporalModel | Upsample2D):
            regions.append((name, module))
        elif isinstance(module, UNetMidBlockSpatioTemporal):
            regions.append((f"{name}.resnets.0", module.resnets[0]))  # called directly, not checkpointed
    for _, module in regions:
        checkpoint_whole(module)
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_module)
    return [name for name, _ in regions]


def is_lora_name(name: str) -> bool:
    return ".lora_" in name


def unfreeze(model: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    """Make trainable every parameter whose name matches a pattern (regex search); return their names."""
    compiled = [re.compile(p) for p in patterns]
    hit = []
    for name, p in model.named_parameters():
        if any(c.search(name) for c in compiled):
            p.requires_grad_(True)
            hit.append(name)
    if compiled and not hit:
        raise ValueError(f"student.unfreeze patterns {[c.pattern for c in compiled]} match no parameter")
    return hit


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA + unfrozen parameters (what a checkpoint must hold), detached and contiguous."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """Copy saved LoRA/unfrozen tensors into a student built the same way (make_student + unfreeze)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"student state has parameters the model lacks (built with other targets?): {unknown[:5]}")
    expected = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(expected - set(state))
    if strict and missing:
        raise KeyError(f"student state lacks trainable parameters (other unfreeze patterns?): {missing[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"student state {name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(value)


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain UNet's state dict with every LoRA delta folded into its base weight."""
    from peft.tuners.lora import LoraLayer

    state = {}
    lora_prefixes = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            lora_prefixes[name] = module
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach()  # shared, not copied: 6 GB at SVD size
    for name, module in lora_prefixes.items():
        key = f"{name}.weight"
        with torch.no_grad():
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter)
                state[key] = state[key] + delta.to(state[key].dtype)
    return state


def merge_student(model: torch.nn.Module):
    """A fresh UNetSpatioTemporalConditionModel with the LoRA merged; the student is left untouched.
    Built on the meta device and given the merged tensors (assign=True): no random init, and the
    weights without LoRA share the student's storage, so exporting the 1.5B-parameter SVD UNet
    costs the merged LoRA layers, not two more copies of the model."""
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel.from_config(model.config)
    unet.load_state_dict(merged_state_dict(model), strict=True, assign=True)
    return unet.eval()
