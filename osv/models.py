"""Model folders: build the small embedded-scale models, load any scale through from_pretrained.

Layout (both scales), so every later stage loads exactly as it would load SVD:
  <folder>/model_index.json, unet/, vae/, image_encoder/, feature_extractor/, scheduler/
    -- a StableVideoDiffusionPipeline folder (models/base, models/teacher)
  models/dinov2/ -- a transformers Dinov2Model folder
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

CONFIG_DIR = resources.files("osv") / "configs"

# SVD img2vid's scheduler config (EDM sigmas, v-prediction); used by the diffusers pipeline.
SVD_SCHEDULER = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
    steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)

# stabilityai/stable-video-diffusion-img2vid vae/config.json: the benchmarks' --shape svd.
SVD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
               sample_size=768, scaling_factor=0.18215)


def small_config(name: str) -> dict:
    """A config from osv/configs/small_<name>.json, without its comment."""
    cfg = json.loads((CONFIG_DIR / f"small_{name}.json").read_text())
    cfg.pop("_comment", None)
    return cfg


def build_small_unet(seed: int = 0, num_frames: int | None = None):
    from diffusers import UNetSpatioTemporalConditionModel

    cfg = small_config("unet")
    if num_frames is not None:
        cfg["num_frames"] = num_frames
    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(**cfg)


def build_small_vae(seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    return temporal_convs_as_conv2d(AutoencoderKLTemporalDecoder(**small_config("vae")))


def build_small_image_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**small_config("clip")))


def build_small_dinov2(seed: int = 0):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**small_config("dinov2")))


def build_small_pipeline(seed: int = 0, num_frames: int | None = None):
    """A StableVideoDiffusionPipeline of randomly initialised small parts."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    return StableVideoDiffusionPipeline(
        vae=build_small_vae(seed),
        image_encoder=build_small_image_encoder(seed + 1),
        unet=build_small_unet(seed + 2, num_frames),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}),
    )


def load_pipeline(folder: str | Path, unet_folder: str | Path | None = None):
    """Load an SVD pipeline folder, optionally with another UNet (a distilled student)."""
    from diffusers import StableVideoDiffusionPipeline

    kwargs = {}
    if unet_folder is not None:
        kwargs["unet"] = load_unet(unet_folder)
    pipe = StableVideoDiffusionPipeline.from_pretrained(str(folder), **kwargs)
    temporal_convs_as_conv2d(pipe.vae)
    return pipe


def load_unet(folder: str | Path):
    from diffusers import UNetSpatioTemporalConditionModel

    folder = Path(folder)
    sub = folder / "unet" if (folder / "unet").is_dir() else folder
    return UNetSpatioTemporalConditionModel.from_pretrained(str(sub))


def load_vae(folder: str | Path):
    from diffusers import AutoencoderKLTemporalDecoder

    folder = Path(folder)
    sub = folder / "vae" if (folder / "vae").is_dir() else folder
    return temporal_convs_as_conv2d(AutoencoderKLTemporalDecoder.from_pretrained(str(sub)))


def load_image_encoder(folder: str | Path):
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder)
    sub = folder / "image_encoder" if (folder / "image_encoder").is_dir() else folder
    return CLIPVisionModelWithProjection.from_pretrained(str(sub))


def load_dinov2(folder: str | Path):
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(str(folder))


class TemporalConv(torch.nn.Conv3d):
    """A (k, 1, 1) Conv3d (the SVD VAE decoder's temporal layers) run as a Conv2d over [B, C, T, H·W]:
    the same sums (round-off aside), but CPU kernels then take the oneDNN path instead of
    slow_conv3d, ~2.5x faster forward + backward at the embedded shapes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.conv2d(x.flatten(3), self.weight.flatten(3), self.bias, padding=(self.padding[0], 0))
        return y.unflatten(3, x.shape[3:])


def temporal_convs_as_conv2d(vae: torch.nn.Module) -> torch.nn.Module:
    """Switch the VAE's (k, 1, 1) Conv3d layers to TemporalConv in place (same parameters, keys, saved files)."""
    for m in vae.modules():
        if (type(m) is torch.nn.Conv3d and m.kernel_size[1:] == (1, 1) and m.padding[1:] == (0, 0)
                and m.stride == (1, 1, 1) and m.dilation == (1, 1, 1) and m.groups == 1
                and m.padding_mode == "zeros"):
            m.__class__ = TemporalConv
    return vae


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
