"""Model folders: build the small embedded-scale models or SVD img2vid's architecture with random
weights (weights.architecture small | svd), load any scale through from_pretrained.

Layout (every scale), so every later stage loads exactly as it would load SVD:
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


# stabilityai/stable-video-diffusion-img2vid(-xt) unet/config.json, the keys that set the
# architecture; diffusers' default UNetSpatioTemporalConditionModel() config has exactly these
# (tests/test_bench.py checks). Its other keys are metadata the forward does not read:
# num_frames (the forward takes T from the input; img2vid publishes 14, the diffusers default
# 25 is img2vid-xt's) and sample_size (96 = 768 px / 8, the pipeline's default size).
SVD_UNET_PUBLISHED = {
    "in_channels": 8, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                         "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                       "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "block_out_channels": [320, 640, 1280, 1280], "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768, "layers_per_block": 2, "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1, "num_attention_heads": [5, 10, 20, 20],
}
SVD_UNET_SAMPLE_SIZE = 96

# stabilityai/stable-video-diffusion-img2vid image_encoder/config.json: OpenCLIP ViT-H/14's vision
# tower (CLIPVisionModelWithProjection, 632M parameters); its other keys are transformers'
# CLIPVisionConfig defaults (num_channels 3, dropouts 0, initializer_range 0.02).
SVD_IMAGE_ENCODER = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu",
                         layer_norm_eps=1e-5)

# SVD's feature_extractor/preprocessor_config.json: CLIPImageProcessor's defaults (OpenAI CLIP
# mean/std, bicubic, shortest edge and centre crop 224); the small pipeline ships the same.
SVD_FEATURE_EXTRACTOR = dict(crop_size=224, size={"shortest_edge": 224})

# facebook/dinov2-small config.json (22M parameters): the discriminator backbone of the svd architecture.
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                    patch_size=14, image_size=518, layerscale_value=1.0)


def svd_unet_config() -> dict:
    """diffusers' default UNetSpatioTemporalConditionModel config (SVD img2vid's), without building it."""
    import inspect

    from diffusers import UNetSpatioTemporalConditionModel

    sig = inspect.signature(UNetSpatioTemporalConditionModel.__init__)
    return {k: list(v.default) if isinstance(v.default, tuple) else v.default
            for k, v in sig.parameters.items() if k != "self"}


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
    from diffusers import StableVideoDiffusionPipeline

    return StableVideoDiffusionPipeline(
        vae=build_small_vae(seed),
        image_encoder=build_small_image_encoder(seed + 1),
        unet=build_small_unet(seed + 2, num_frames),
        scheduler=build_scheduler(),
        feature_extractor=build_feature_extractor(),
    )


def build_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SVD_SCHEDULER)


def build_feature_extractor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**SVD_FEATURE_EXTRACTOR)


def build_svd_unet(seed: int = 0, num_frames: int | None = None):
    """SVD img2vid's UNet (1.5B parameters, 6.1 GB fp32), randomly initialised."""
    from diffusers import UNetSpatioTemporalConditionModel

    cfg = {**svd_unet_config(), "sample_size": SVD_UNET_SAMPLE_SIZE}
    if num_frames is not None:
        cfg["num_frames"] = num_frames
    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(**cfg)


def build_svd_vae(seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    return temporal_convs_as_conv2d(AutoencoderKLTemporalDecoder(**SVD_VAE))


def build_svd_image_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_IMAGE_ENCODER))


def build_dinov2_small(seed: int = 0):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**DINOV2_SMALL))


# weights.architecture -> part -> builder(seed[, num_frames]); the pipeline parts of osv weights
BUILDERS = {
    "small": {"vae": build_small_vae, "image_encoder": build_small_image_encoder, "unet": build_small_unet,
              "dinov2": build_small_dinov2},
    "svd": {"vae": build_svd_vae, "image_encoder": build_svd_image_encoder, "unet": build_svd_unet,
            "dinov2": build_dinov2_small},
}


def pipeline_index(folder: str | Path) -> None:
    """Write the model_index.json of a StableVideoDiffusionPipeline folder, as save_pretrained writes
    it first. It names the parts' classes only, the same for both architectures, so the small
    pipeline (built in a second) stands in for the big one."""
    build_small_pipeline().save_config(str(folder))


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
