"""The OSV discriminator (method.md §5): latent upsampler -> frozen DINOv2 -> spatial + temporal heads.

Front ends (params `disc.front_end`):
  latent [paper]: a trainable LatentUpsampler (Conv2d 4 -> 3·r², PixelShuffle(r)) maps
      each frame's latent to a small RGB-like image. Its output is treated as lying
      in a [-1, 1]-like range, like decoded pixels, so both front ends share one path.
  vae (ablation e): the frozen VAE decoder turns latents / scaling_factor into RGB
      in [-1, 1] (decode with num_frames=T, a few videos per chunk). disc.vae_downscale = f > 1
      [gap] area-averages the latents by f before decoding (frames of (h/f)·8 x (w/f)·8 pixels):
      the memory of backpropagating through the decoder scales with the decoded pixels
      (docs/benchmarks.md, "Memory at paper scale"), and DINOv2 sees backbone_input² either way.
Shared path: bilinear resize to backbone_input x backbone_input (antialias off: the
resize is a differentiable, cheap interpolation; non-square frames are stretched),
map [-1, 1] -> [0, 1], ImageNet mean/std (what DINOv2 was trained on), then the
frozen Dinov2Model. Frozen means eval mode and requires_grad False, never no_grad:
the generator is trained through D, so gradients flow through DINOv2 (and the VAE)
back to the input latents.

Heads, one pair per tapped block l (hidden_states[l + 1] is the output of block l;
CLS/register tokens dropped, patch tokens reshaped to the grid):
  spatial: Conv2d(1x1) -> ResBlock2d(3x3) -> Conv2d(1x1 -> 1) on each frame's grid ((b·t) c h w);
  temporal: Conv1d(1) -> ResBlock1d(3, padding 1, so T = 1 works) -> Conv1d(1 -> 1) over frames
      for each token ((b·h·w) c t).
Normalisation is GroupNorm (>= 4 channels a group, so it is defined even for T = 1 and
a 1x1 grid) with LeakyReLU(0.2), StyleGAN-T-like heads without its spectral norm.
forward returns logits [B, K], every head's positions concatenated, so the hinge
loss's mean is the mean over heads and positions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from osv.models import temporal_convs_as_conv2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FRONT_ENDS = ("latent", "vae")


def _groups(channels: int) -> int:
    """Most GroupNorm groups (<= 32) that divide `channels` with >= 4 channels each (1 if none)."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class LatentUpsampler(nn.Module):
    """Per frame Conv2d(latent_channels -> 3·r², 3x3, padding 1) then PixelShuffle(r) [paper]."""

    def __init__(self, latent_channels: int = 4, r: int = 4):
        super().__init__()
        self.r = r
        self.conv = nn.Conv2d(latent_channels, 3 * r * r, kernel_size=3, padding=1)
        self.shuffle = nn.PixelShuffle(r)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] -> [N, 3, h·r, w·r]."""
        return self.shuffle(self.conv(latents))


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, LeakyReLU, conv) in 1D or 2D."""

    def __init__(self, channels: int, dims: int, kernel_size: int = 3):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels), nn.LeakyReLU(0.2),
            conv(channels, channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(_groups(channels), channels), nn.LeakyReLU(0.2),
            conv(channels, channels, kernel_size, padding=kernel_size // 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def make_head(in_channels: int, channels: int, dims: int) -> nn.Sequential:
    """Conv(1) -> ResBlock -> Conv(1 -> 1 logit) in `dims` (2 = spatial, 1 = temporal)."""
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    return nn.Sequential(conv(in_channels, channels, 1), ResBlock(channels, dims),
                         nn.LeakyReLU(0.2), conv(channels, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, backbone: nn.Module, front_end: str = "latent", vae: nn.Module | None = None,
                 upsample_factor: int = 4, backbone_input: int = 224, layers=(2, 5, 8, 11),
                 head_channels: int = 64, latent_channels: int = 4, decode_chunk: int = 1,
                 vae_downscale: int = 1):
        super().__init__()
        cfg = backbone.config
        if front_end not in FRONT_ENDS:
            raise ValueError(f"disc.front_end must be one of {FRONT_ENDS}, got {front_end!r}")
        if front_end == "vae" and vae is None:
            raise ValueError("disc.front_end = vae needs the VAE (pass vae=...)")
        if vae_downscale < 1:
            raise ValueError(f"disc.vae_downscale must be >= 1, got {vae_downscale}")
        if backbone_input % cfg.patch_size:
            raise ValueError(f"disc.backbone_input = {backbone_input} is not a multiple of the "
                             f"DINOv2 patch size {cfg.patch_size}")
        bad = [layer for layer in layers if not 0 <= layer < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"disc.layers {bad} out of range: the DINOv2 backbone has "
                             f"{cfg.num_hidden_layers} blocks (0..{cfg.num_hidden_layers - 1})")
        self.front_end = front_end
        self.backbone_input = backbone_input
        self.layers = list(layers)
        self.grid = backbone_input // cfg.patch_size
        self.decode_chunk = decode_chunk
        self.vae_downscale = vae_downscale
        self.backbone = _freeze(backbone)
        self.vae = _freeze(temporal_convs_as_conv2d(vae)) if front_end == "vae" else None
        self.upsampler = LatentUpsampler(latent_channels, upsample_factor) if front_end == "latent" else None
        c = cfg.hidden_size
        self.heads = nn.ModuleDict({
            "spatial": nn.ModuleList(make_head(c, head_channels, 2) for _ in self.layers),
            "temporal": nn.ModuleList(make_head(c, head_channels, 1) for _ in self.layers),
        })
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_params(cls, params: dict, dinov2_folder, vae: nn.Module | None = None) -> Discriminator:
        """Build from params['disc']; `dinov2_folder` is a Dinov2Model folder (or an already built model)."""
        from osv.models import load_dinov2

        d = params["disc"]
        if isinstance(dinov2_folder, nn.Module):
            backbone = dinov2_folder
        else:
            if not (Path(dinov2_folder) / "config.json").is_file():
                raise FileNotFoundError(f"{dinov2_folder}: not a DINOv2 folder (no config.json)")
            backbone = load_dinov2(dinov2_folder)
        latent_channels = vae.config.latent_channels if vae is not None else 4
        return cls(backbone, d["front_end"], vae if d["front_end"] == "vae" else None,
                   d["upsample_factor"], d["backbone_input"], d["layers"], d["head_channels"],
                   latent_channels, vae_downscale=d.get("vae_downscale", 1))

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen parts never switch to training behaviour (dropout)
        if self.vae is not None:
            self.vae.eval()
        return self

    def enable_gradient_checkpointing(self) -> list[str]:
        """train.grad_checkpointing: checkpoint the VAE decoder (vae front end); returns its regions."""
        return checkpoint_decoder(self.vae) if self.vae is not None else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Upsampler (latent front end) + heads; DINOv2 and the VAE stay frozen."""
        modules = [self.heads] + ([self.upsampler] if self.upsampler is not None else [])
        return [p for m in modules for p in m.parameters()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        keep = ("upsampler.", "heads.")
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k.startswith(keep)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            raise KeyError(f"discriminator state mismatch: missing {sorted(expected - set(state))[:5]}, "
                           f"unexpected {sorted(set(state) - expected)[:5]} (other disc params?)")
        self.load_state_dict(state, strict=False)

    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, T, C, h, w] -> RGB-like frames [B·T, 3, H, W] in a [-1, 1]-like range."""
        b, t = latents.shape[:2]
        if self.upsampler is not None:
            return self.upsampler(latents.flatten(0, 1).to(_dtype(self.upsampler)))
        z = latents.to(_dtype(self.vae)) / self.vae.config.scaling_factor
        if self.vae_downscale > 1:
            h, w = z.shape[-2:]
            size = (max(1, h // self.vae_downscale), max(1, w // self.vae_downscale))
            z = F.adaptive_avg_pool2d(z.flatten(0, 1), size).unflatten(0, (b, t))
        chunks = [self.vae.decode(z[i:i + self.decode_chunk].flatten(0, 1), num_frames=t).sample
                  for i in range(0, b, self.decode_chunk)]
        return torch.cat(chunks)

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Frames [N, 3, H, W] in [-1, 1] -> DINOv2 patch-token grids [N, C, g, g] after each tapped block."""
        x = F.interpolate(pixels.float(), size=(self.backbone_input,) * 2, mode="bilinear",
                          align_corners=False, antialias=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        out = self.backbone(pixel_values=x.to(_dtype(self.backbone)), output_hidden_states=True)
        grids = []
        for layer in self.layers:
            tokens = out.hidden_states[layer + 1]
            tokens = tokens[:, tokens.shape[1] - self.grid * self.grid:]  # drop CLS/register tokens
            n, _, c = tokens.shape
            grids.append(tokens.transpose(1, 2).reshape(n, c, self.grid, self.grid))
        return grids

    @property
    def frozen_front_end(self) -> bool:
        """True when latents -> DINOv2 features has no trainable part (vae front end): the
        features of a sample then do not change with a D update and can be reused."""
        return self.upsampler is None

    def features_of(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """latents [B, T, C, h, w] -> DINOv2 grids [B·T, C, g, g] per tapped block."""
        if latents.dim() != 5:
            raise ValueError(f"Discriminator expects latents [B, T, C, h, w], got {tuple(latents.shape)}")
        return self.features(self.to_pixels(latents))

    def logits(self, grids: list[torch.Tensor], b: int) -> torch.Tensor:
        """The heads on `features_of` grids of b videos -> logits [B, K], K = layers · 2 · T · g²."""
        logits = []
        head_dtype = _dtype(self.heads)
        for i, feat in enumerate(grids):
            feat = feat.to(head_dtype)
            n, c, g, _ = feat.shape
            t = n // b
            logits.append(self.heads["spatial"][i](feat).reshape(b, t * g * g))
            seq = feat.reshape(b, t, c, g * g).permute(0, 3, 2, 1).reshape(b * g * g, c, t)
            logits.append(self.heads["temporal"][i](seq).reshape(b, g * g * t))
        return torch.cat(logits, dim=1).float()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, T, C, h, w] -> logits [B, K]."""
        return self.logits(self.features_of(latents), latents.shape[0])


def checkpoint_decoder(vae: nn.Module) -> list[str]:
    """Gradient checkpointing of the SVD VAE decoder: one region per ResnetBlock2D,
    TemporalResnetBlock, attention and upsampler (osv.memory.checkpoint_whole); returns their names.

    diffusers' own (`vae.enable_gradient_checkpointing`) makes the mid block and each whole up
    block a region, so backward recomputes a whole full-resolution up block (three
    spatio-temporal resnets) at once: at 1024x576x14 that region alone keeps ~128 GiB. The
    regions here cost the same recompute; the largest keeps ~30 GiB, with ~38 GiB held between
    forward and backward (extrapolated, docs/benchmarks.md "Memory at paper scale"), hence also
    disc.vae_downscale. The decoder's own flag stays off (no nested regions). Gradients are
    those of the plain forward.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock
    from diffusers.models.upsampling import Upsample2D

    from osv.memory import checkpoint_whole

    names = []
    for name, module in vae.decoder.named_modules():
        if isinstance(module, ResnetBlock2D | TemporalResnetBlock | Attention | Upsample2D):
            checkpoint_whole(module).gradient_checkpointing = True
            names.append(f"decoder.{name}")
    return names


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()
