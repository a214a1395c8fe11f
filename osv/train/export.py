"""Export of a training run, models/RUN/ (docs/design.md), written atomically:

  unet/                 the student with its LoRA merged (diffusers folder; loads with
                        UNetSpatioTemporalConditionModel.from_pretrained)
  student.safetensors   LoRA + unfrozen layers, unmerged (initialises a later stage)
  ema.safetensors       the EMA θ⁻ of those parameters
  disc.safetensors      the discriminator's trainable state (upsampler + heads; empty when λ_adv = 0)
  sampler.json          how to sample it (sigmas, recommended sampler, conditioning, size)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FILES = ("student.safetensors", "ema.safetensors", "disc.safetensors")


def sampler_config(params: dict) -> dict:
    sde, cond, data = params["sde"], params["conditioning"], params["data"]
    return {
        "sigma_min": sde["sigma_min"], "sigma_max": sde["sigma_max"], "rho": sde["rho"],
        "num_sigmas": sde["num_sigmas"], "sampler": "tts", "steps": 1, "boundary": params["student"]["boundary"],
        "fps": data["fps"], "motion_bucket_id": cond["motion_bucket_id"],
        "noise_aug_strength": cond["noise_aug_strength"], "frames": data["frames"],
        "resolution": dict(data["resolution"]),
    }


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def export_run(out, student, ema: dict[str, torch.Tensor], disc_state: dict[str, torch.Tensor] | None,
               params: dict, info: dict) -> Path:
    """Write models/RUN/ atomically; `info` (run, stage, step, provenance) goes into sampler.json."""
    from safetensors.torch import save_file

    from osv.atomic import atomic_path
    from osv.student import merge_student, trainable_state_dict

    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        merge_student(student).to("cpu").save_pretrained(tmp / "unet")
        meta = {k: str(v) for k, v in info.items() if isinstance(v, str | int | float)}
        save_file(_cpu(trainable_state_dict(student)), str(tmp / "student.safetensors"), metadata=meta)
        save_file(_cpu(ema), str(tmp / "ema.safetensors"), metadata=meta)
        save_file(_cpu(disc_state or {}), str(tmp / "disc.safetensors"), metadata=meta)
        config = {**sampler_config(params), "run": info}
        (tmp / "sampler.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_export(folder) -> dict[str, dict[str, torch.Tensor]]:
    """{'student', 'ema', 'disc'} state dicts of an earlier run's export (for stage-2 init)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a training-run export (missing {', '.join(missing)}); "
                                "run `osv train` for that run first, or use --init models/teacher")
    return {f.split(".")[0]: load_file(str(folder / f)) for f in FILES}
