"""SVD image conditioning (method.md §1): CLIP embedding, first-frame latent, added_time_ids.

Semantics follow diffusers' StableVideoDiffusionPipeline: the first frame is resized to the
video size, noised in pixel space by noise_aug_strength * eps, encoded with the VAE (mode,
NOT multiplied by scaling_factor), and concatenated to every frame; the unconditional branch
zeroes the CLIP embedding and the latent and keeps the time ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class SVDConditioning:
    image_embeds: Tensor  # [B, 1, D] CLIP image embedding (cross-attention)
    cond_latents: Tensor  # [B, 4, h, w] noised first-frame VAE latent (unscaled)
    added_time_ids: Tensor  # [B, 3] = [fps - 1, motion_bucket_id, noise_aug_strength]

    @property
    def batch_size(self) -> int:
        return self.image_embeds.shape[0]

    def uncond(self) -> SVDConditioning:
        """The CFG negative branch c0, as the pipeline builds it."""
        return SVDConditioning(torch.zeros_like(self.image_embeds), torch.zeros_like(self.cond_latents),
                               self.added_time_ids)

    @classmethod
    def cat(cls, conds: list[SVDConditioning]) -> SVDConditioning:
        return cls(torch.cat([c.image_embeds for c in conds]), torch.cat([c.cond_latents for c in conds]),
                   torch.cat([c.added_time_ids for c in conds]))

    def repeat_interleave(self, n: int) -> SVDConditioning:
        """Each conditioning n times in a row (n videos per image)."""
        return SVDConditioning(self.image_embeds.repeat_interleave(n, 0), self.cond_latents.repeat_interleave(n, 0),
                               self.added_time_ids.repeat_interleave(n, 0))

    def select(self, index) -> SVDConditioning:
        """Rows `index` (a slice, int list or bool mask) of every tensor."""
        return SVDConditioning(self.image_embeds[index], self.cond_latents[index], self.added_time_ids[index])

    def to(self, device=None, dtype=None) -> SVDConditioning:
        return SVDConditioning(self.image_embeds.to(device=device, dtype=dtype),
                               self.cond_latents.to(device=device, dtype=dtype),
                               self.added_time_ids.to(device=device, dtype=dtype))


def make_added_time_ids(fps: float, motion_bucket_id: float, noise_aug_strength: float, batch: int,
                        dtype=torch.float32, device=None) -> Tensor:
    """[batch, 3] added_time_ids. `fps` is the real frame rate; the tensor stores fps - 1,
    the value SVD's UNet was micro-conditioned on (the pipeline subtracts 1 before the UNet)."""
    row = torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=dtype, device=device)
    return row.repeat(batch, 1)


def from_batch(batch: dict, params: dict, device=None, dtype=torch.float32) -> SVDConditioning:
    """SVDConditioning from a LatentDataset item or collated batch (keys in docs/design.md)."""
    for key in ("image_embeds", "cond_latents"):
        if key not in batch:
            raise KeyError(f"conditioning.from_batch: latent batch has no {key!r} (keys: {sorted(batch)})")
    embeds, latents = batch["image_embeds"], batch["cond_latents"]
    if latents.ndim == 3:  # one clip, not collated
        embeds, latents = embeds.unsqueeze(0), latents.unsqueeze(0)
    cond = params["conditioning"]
    time_ids = make_added_time_ids(params["data"]["fps"], cond["motion_bucket_id"], cond["noise_aug_strength"],
                                   latents.shape[0])
    return SVDConditioning(embeds, latents, time_ids).to(device=device, dtype=dtype)


def _clip_pixels(image, feature_extractor) -> Tensor:
    """The pipeline's _encode_image preprocessing: [0,1] -> antialiased 224x224 -> CLIP-normalised."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )
    from diffusers.video_processor import VideoProcessor

    if not isinstance(image, torch.Tensor):
        image = VideoProcessor.numpy_to_pt(VideoProcessor.pil_to_numpy(image))
    # Tensors are resized too (the pipeline assumes they are 224x224 already; there this is ~identity).
    image = _resize_with_antialiasing(image * 2.0 - 1.0, (224, 224))
    image = (image + 1.0) / 2.0
    return feature_extractor(images=image, do_normalize=True, do_center_crop=False, do_resize=False,
                             do_rescale=False, return_tensors="pt").pixel_values


@torch.no_grad()
def encode_condition(image, vae, image_encoder, feature_extractor, noise_aug_strength: float = 0.02,
                     generator: torch.Generator | None = None, height: int | None = None,
                     width: int | None = None, fps: float = 7, motion_bucket_id: float = 127,
                     device=None) -> SVDConditioning:
    """SVDConditioning for PIL image(s) or a [B,3,H,W] tensor in [0,1], as the SVD pipeline builds it.

    Draws the pixel noise from `generator` first (as the pipeline does, before the initial
    latents), so passing the same generator on to `teacher_sample` reproduces the pipeline.
    """
    from diffusers.utils.torch_utils import randn_tensor
    from diffusers.video_processor import VideoProcessor

    device = torch.device(device or vae.device)
    enc_dtype = next(image_encoder.parameters()).dtype
    pixels = _clip_pixels(image, feature_extractor).to(device=device, dtype=enc_dtype)
    embeds = image_encoder(pixels).image_embeds.unsqueeze(1)
    processor = VideoProcessor(do_resize=True, vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    frame = processor.preprocess(image, height=height, width=width).to(device)
    frame = frame + noise_aug_strength * randn_tensor(frame.shape, generator=generator, device=device,
                                                      dtype=frame.dtype)
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # the pipeline encodes fp16 VAEs in fp32
    if upcast:
        vae.to(dtype=torch.float32)
    latents = vae.encode(frame.to(vae.dtype)).latent_dist.mode().to(embeds.dtype)
    if upcast:
        vae.to(dtype=torch.float16)
    time_ids = make_added_time_ids(fps, motion_bucket_id, noise_aug_strength, latents.shape[0],
                                   dtype=embeds.dtype, device=device)
    return SVDConditioning(embeds, latents, time_ids)
