"""A one-line entry point to an exported student: image in, video out, with OSV's own samplers.

    from PIL import Image
    from osv.pipeline import OSVPipeline

    pipe = OSVPipeline.from_pretrained("models/stage2")    # or a hub repo id ("ORG/NAME", endpoint=, revision=)
    result = pipe(Image.open("first_frame.png"), seed=0)   # 1 step + TTS: NFE 2
    pipe.save_mp4(result.frames, "video.mp4")

`osv train` exports models/RUN as a diffusers pipeline folder (osv/train/export.py): the
student as unet/, the teacher's vae/, image_encoder/, feature_extractor/ and scheduler/, and a
model_index.json naming this class through the folder's osv_pipeline.py shim, so
`DiffusionPipeline.from_pretrained("models/RUN", trust_remote_code=True)` loads it too. The
sampler settings (sampler.json's) are the pipeline's `sampler` config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline

from osv import models
from osv.conditioning import SVDConditioning, encode_condition
from osv.samplers import consistency_sample, decode_latents, tts_sample
from osv.sde import Denoiser, unet_network
from osv.video import tensor_to_uint8, write_mp4

# The exported folder's pipeline module: diffusers imports it to find this class (model_index.json
# names ["osv_pipeline", "OSVPipeline"]); from_pretrained runs no other folder code.
SHIM_NAME = "osv_pipeline"
SHIM = ('"""The OSV pipeline class for diffusers (needs the osv package: pip install osv)."""\n'
        "from osv.pipeline import OSVPipeline\n\n__all__ = [\"OSVPipeline\"]\n")


@dataclass
class VideoResult:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    nfe: int


class OSVPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "image_encoder->unet->vae"

    def __init__(self, vae, image_encoder, unet, scheduler, feature_extractor, sampler: dict | None = None):
        super().__init__()
        self.register_modules(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                              feature_extractor=feature_extractor)
        self.register_to_config(sampler=sampler)
        models.temporal_convs_as_conv2d(vae)  # as models.load_vae: the same VAE numerics as osv generate

    @property
    def settings(self) -> dict:
        return self.config.sampler

    @property
    def denoiser(self) -> Denoiser:
        s = self.settings
        return Denoiser(unet_network(self.unet), boundary=s.get("boundary", "approx"), sigma_min=s["sigma_min"])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, teacher: str | Path | None = None, **kwargs):
        """An `osv train` export (folder or hub repo id). `teacher=` assembles a bare unet/ + sampler.json
        folder (an export older than model_index.json) with a teacher pipeline folder's parts."""
        folder = Path(pretrained_model_name_or_path)
        if teacher is not None or (folder.is_dir() and not (folder / "model_index.json").exists()):
            return cls._assemble(folder, teacher, kwargs.pop("device", "cpu"))
        if not folder.is_dir():  # a hub repo id: download first, so that its shim is checked before it runs
            folder = _download(str(pretrained_model_name_or_path), kwargs)
        _check_shim(folder)
        return super().from_pretrained(str(folder), trust_remote_code=True, **kwargs)

    @classmethod
    def _assemble(cls, student: Path, teacher, device: str) -> OSVPipeline:
        settings_path = student / "sampler.json"
        if not settings_path.exists():
            raise FileNotFoundError(f"{settings_path}: not an `osv train` export (no sampler.json)")
        if teacher is None:
            raise FileNotFoundError(f"{student}: no model_index.json; pass teacher= (a teacher pipeline folder)")
        svd = models.load_pipeline(teacher, unet_folder=student / "unet")
        return cls(svd.vae, svd.image_encoder, svd.unet, svd.scheduler, svd.feature_extractor,
                   sampler=json.loads(settings_path.read_text())).to(device)

    @torch.no_grad()
    def __call__(self, image=None, seed: int = 0, sampler: str | None = None, steps: int | None = None,
                 cond: SVDConditioning | None = None, generator: torch.Generator | None = None) -> VideoResult:
        """sampler: 'tts' (1 step, NFE 2) or 'consistency' (`steps` steps); defaults from the export.
        `cond` (e.g. conditioning.from_batch of stored latents) replaces encoding `image`: then the
        noise is the generator's first draw, exactly as in `osv generate`. Returns the batch's first video."""
        s = self.settings
        sampler, steps = sampler or s["sampler"], steps or s["steps"]
        width, height = s["resolution"]["width"], s["resolution"]["height"]
        generator = generator or torch.Generator(self.device).manual_seed(seed)
        if cond is None:
            cond = encode_condition(image, self.vae, self.image_encoder, self.feature_extractor,
                                    noise_aug_strength=s["noise_aug_strength"], generator=generator, height=height,
                                    width=width, fps=s["fps"], motion_bucket_id=s["motion_bucket_id"])
        cond = cond.to(self.device)
        shape = (cond.batch_size, s["frames"], self.unet.config.out_channels, height // 8, width // 8)
        grid = dict(num_sigmas=s["num_sigmas"], sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], rho=s["rho"])
        if sampler == "tts":
            out = tts_sample(self.denoiser, cond, shape, generator=generator, **grid)
        elif sampler == "consistency":
            out = consistency_sample(self.denoiser, cond, shape, steps=steps, generator=generator, **grid)
        else:
            raise ValueError(f"OSVPipeline: sampler must be 'tts' or 'consistency', got {sampler!r}")
        frames = decode_latents(self.vae, out.latents, chunk=s["frames"])[0]
        return VideoResult(tensor_to_uint8(frames), out.nfe)

    def save_mp4(self, frames: np.ndarray, path: str | Path) -> None:
        write_mp4(path, frames, self.settings["fps"])


def _download(repo_id: str, kwargs: dict) -> Path:
    """The repo's snapshot without the training-only files (student/EMA/discriminator states)."""
    from huggingface_hub import snapshot_download

    from osv.hub import endpoint_url

    options = {k: kwargs.pop(k, None) for k in ("revision", "token", "cache_dir")}
    return Path(snapshot_download(repo_id, endpoint=endpoint_url(kwargs.pop("endpoint", None)), **options,
                                  ignore_patterns=["student.safetensors", "ema.safetensors", "disc.safetensors"]))


def _check_shim(folder: Path) -> None:
    """Refuse to import a folder's pipeline module unless it is the shim osv writes."""
    shim = folder / f"{SHIM_NAME}.py"
    if shim.exists() and shim.read_text() != SHIM:  # no shim: a save_pretrained folder naming OSVPipeline
        raise ValueError(f"{shim}: not the osv shim; load it with DiffusionPipeline.from_pretrained("
                         "..., trust_remote_code=True) if you trust its code")
