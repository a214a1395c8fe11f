"""A few-line entry point to the exported student: image in, video out.

    from PIL import Image
    from osv.pipeline import OSVPipeline

    pipe = OSVPipeline.from_pretrained("models/stage2", teacher="models/teacher")
    result = pipe(Image.open("first_frame.png"), seed=0)   # 1 step + TTS: NFE 2
    pipe.save_mp4(result.frames, "video.mp4")

The student folder is what `osv train` exports (unet/ with the LoRA merged, and
sampler.json); the teacher folder supplies the VAE and the CLIP image encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from osv import models
from osv.conditioning import encode_condition
from osv.samplers import consistency_sample, decode_latents, tts_sample
from osv.sde import Denoiser, unet_network
from osv.video import tensor_to_uint8, write_mp4


@dataclass
class VideoResult:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    nfe: int


class OSVPipeline:
    def __init__(self, pipe, settings: dict):
        self.pipe, self.settings = pipe, settings
        self.denoiser = Denoiser(unet_network(pipe.unet), boundary=settings.get("boundary", "approx"),
                                 sigma_min=settings["sigma_min"])

    @classmethod
    def from_pretrained(cls, student: str | Path, teacher: str | Path, device: str = "cpu") -> OSVPipeline:
        settings_path = Path(student) / "sampler.json"
        if not settings_path.exists():
            raise FileNotFoundError(f"{settings_path}: not an `osv train` export (no sampler.json)")
        pipe = models.load_pipeline(teacher, unet_folder=Path(student) / "unet").to(device)
        return cls(pipe, json.loads(settings_path.read_text()))

    @torch.no_grad()
    def __call__(self, image, seed: int = 0, sampler: str | None = None, steps: int | None = None) -> VideoResult:
        """sampler: 'tts' (1 step, NFE 2) or 'consistency' (`steps` steps); defaults from sampler.json."""
        s = self.settings
        sampler, steps = sampler or s["sampler"], steps or s["steps"]
        width, height = s["resolution"]["width"], s["resolution"]["height"]
        generator = torch.Generator(self.pipe.device).manual_seed(seed)
        cond = encode_condition(image, self.pipe.vae, self.pipe.image_encoder, self.pipe.feature_extractor,
                                noise_aug_strength=s["noise_aug_strength"], generator=generator, height=height,
                                width=width, fps=s["fps"], motion_bucket_id=s["motion_bucket_id"])
        shape = (1, s["frames"], self.pipe.unet.config.out_channels, height // 8, width // 8)
        grid = dict(num_sigmas=s["num_sigmas"], sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], rho=s["rho"])
        if sampler == "tts":
            out = tts_sample(self.denoiser, cond, shape, generator=generator, **grid)
        elif sampler == "consistency":
            out = consistency_sample(self.denoiser, cond, shape, steps=steps, generator=generator, **grid)
        else:
            raise ValueError(f"OSVPipeline: sampler must be 'tts' or 'consistency', got {sampler!r}")
        frames = decode_latents(self.pipe.vae, out.latents, chunk=s["frames"])[0]
        return VideoResult(tensor_to_uint8(frames), out.nfe)

    def save_mp4(self, frames: np.ndarray, path: str | Path) -> None:
        write_mp4(path, frames, self.settings["fps"])
