"""`osv vae`: the video VAE (AutoencoderKLTemporalDecoder) that every later stage uses.

Embedded scale (vae.steps > 0): the small randomly initialised VAE of models/base
is trained on random crops of the training clips (L1 + L2 reconstruction of the latent
mode + a tiny KL, as the LDM autoencoders; residual blocks start as the identity),
fine-tuned briefly on whole frames, then its scaling_factor is set to 1 / std of the training
latents (how SD's 0.18215 was chosen) so scaled latents have unit variance, as
the EDM preconditioning of the teacher assumes. Paper scale (vae.steps == 0):
SVD's VAE is copied unchanged. Both report reconstruction PSNR on the test clips.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from osv.atomic import atomic_path
from osv.numerics import injected, require_finite, require_finite_module

WARMUP_STEPS = 20


def load_split_frames(clips: str | Path, split: str, params: dict) -> torch.Tensor:
    """Every clip of a split at data.resolution: uint8 [n, T, 3, H, W]."""
    from osv.data import read_manifest
    from osv.video import load_clip

    d = params["data"]
    w, h = d["resolution"]["width"], d["resolution"]["height"]
    rows = read_manifest(Path(clips) / "manifest.csv", split)
    if not rows:
        raise ValueError(f"{clips}/manifest.csv: no '{split}' clips")
    frames = [load_clip(Path(clips) / r["video"], d["frames"], d["fps"], w, h) for r in rows]
    return torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3).contiguous()


def to_signed(frames: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1] (SVD's pixel range)."""
    return frames.float() / 127.5 - 1.0


@torch.no_grad()
def reconstruct(vae, clip: torch.Tensor) -> torch.Tensor:
    """Encode (latent mode) and decode one clip [T, 3, H, W] in [-1, 1]; the decoder mixes all T frames."""
    z = vae.encode(clip).latent_dist.mode()
    return vae.decode(z, num_frames=clip.shape[0]).sample


@torch.no_grad()
def psnr_db(vae, clips: torch.Tensor, device: str = "cpu") -> float:
    """Mean over clips of the clip PSNR (dB, pixel range [0, 1]) of encode->decode."""
    vae.eval()
    values = []
    for clip in tqdm(clips, desc="vae psnr", unit="clip", leave=False):
        x = to_signed(clip).to(device)
        y = reconstruct(vae, x).clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).mean().item()
        values.append(10 * math.log10(1.0 / max(mse, 1e-12)))
    return float(np.mean(values))


def sample_batch(frames: torch.Tensor, batch_size: int, chunk: int, crop: int, gen: torch.Generator):
    """batch_size // chunk chunks of `chunk` consecutive frames of random clips, in [-1, 1].

    A chunk shares one crop window and flip. Returns (x [batch, 3, h, w], num_frames):
    the temporal decoder mixes the frames of each chunk.
    """
    n, T, _, H, W = frames.shape
    chunk = min(T, batch_size, chunk)
    ch, cw = (min(crop, H), min(crop, W)) if crop else (H, W)
    out = []
    for _ in range(max(1, batch_size // chunk)):
        i, t0 = (int(v) for v in (torch.randint(n, (1,), generator=gen), torch.randint(T - chunk + 1, (1,), generator=gen)))
        y0 = int(torch.randint(H - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(W - cw + 1, (1,), generator=gen))
        x = frames[i, t0:t0 + chunk, :, y0:y0 + ch, x0:x0 + cw]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        out.append(x)
    return to_signed(torch.cat(out)), chunk


def init_for_training(vae) -> None:
    """Start every residual block (and the output frame mixer) as the identity.

    Zero last convs of the ResNet / temporal ResNet branches and of the attention outputs,
    and an identity time_conv_out: the randomly initialised GroupNorm stack then starts as
    a short linear path (convs in/out, shortcuts, resamplers) and learns far faster; a
    random time_conv_out would first have to unlearn mixing colours across frames.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock

    with torch.no_grad():
        for m in vae.modules():
            last = (m.conv2 if isinstance(m, (ResnetBlock2D, TemporalResnetBlock))
                    else m.to_out[0] if isinstance(m, Attention) else None)
            if last is not None:
                last.weight.zero_()
                last.bias.zero_()
        mix = vae.decoder.time_conv_out  # Conv3d, kernel (3, 1, 1) over frames
        mix.weight.zero_()
        mix.bias.zero_()
        for c in range(mix.in_channels):
            mix.weight[c, c, 1, 0, 0] = 1.0


def vae_loss(vae, x: torch.Tensor, num_frames: int, kl_weight: float, bf16: bool):
    """Mean L1 + L2 reconstruction of the latent mode + kl_weight * KL (both per element).

    The decoder sees the posterior mode, as every later stage does (encode uses .mode()):
    with a tiny KL weight, sampling only injects unit noise that the encoder must first
    learn to shrink, which stalls the first hundreds of steps.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.mode(), num_frames=num_frames).sample.float()
    d = y - x
    loss = (d.abs() + d.pow(2)).mean() + kl_weight * posterior.kl().float().sum() / x.numel()
    return loss, (d.detach() / 2).pow(2).mean()


def training_precision(v: dict, device: str) -> str:
    """vae.precision resolved for this machine ('fp32' or 'bf16'), refused before any work if unsafe."""
    from osv.params import ParamsError
    from osv.precision import resolve

    precision = resolve(v["precision"], device, "vae.precision")
    if precision == "bf16" and device == "cpu" and v["crop"] == 0:
        raise ParamsError("vae.precision = bf16 with vae.crop = 0: whole-frame bf16 training corrupts the heap "
                          "in torch's CPU kernels; set vae.crop > 0 (e.g. 32) or vae.precision: fp32")
    return precision


def fit(vae, frames: torch.Tensor, gen: torch.Generator, *, steps: int, batch_size: int, chunk_frames: int,
        crop: int, lr: float, kl_weight: float, bf16: bool, warmup: int, device: str, desc: str) -> list[float]:
    """Adam (linear warmup, cosine decay over `steps`) on vae_loss; per-step training MSE."""
    vae.train().to(device)
    # foreach: the same numbers as the per-tensor loop torch picks on CPU, ~13% faster per step here
    # (~250 small tensors).
    opt = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.9, 0.99), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    history = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        x, num_frames = sample_batch(frames, batch_size, chunk_frames, crop, gen)
        loss, mse = vae_loss(vae, x.to(device), num_frames, kl_weight, bf16)
        loss = loss * injected("vae", step)
        require_finite("vae", {f"{desc} loss": loss}, step,
                       hint="bf16 autocast on a CPU without native bf16 does this: vae.precision: fp32" if bf16 else "")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(mse.item())
        bar.set_postfix(psnr=f"{10 * math.log10(1 / max(np.mean(history[-20:]), 1e-12)):.1f}")
    return history


def train_vae(vae, frames: torch.Tensor, v: dict, seed: int, device: str = "cpu", precision: str = "fp32") -> list[float]:
    """Crop training from an identity start (vae.steps, under bf16 autocast if `precision` is bf16)."""
    torch.manual_seed(seed)
    init_for_training(vae)
    return fit(vae, frames, torch.Generator().manual_seed(seed), steps=v["steps"], batch_size=v["batch_size"],
               chunk_frames=v["chunk_frames"], crop=v["crop"], lr=v["lr"], kl_weight=v["kl_weight"],
               bf16=precision == "bf16", warmup=WARMUP_STEPS, device=device, desc="vae train")


def finetune_vae(vae, frames: torch.Tensor, v: dict, seed: int, device: str = "cpu") -> list[float]:
    """A short whole-frame fp32 fine-tune (vae.finetune) after the crop training.

    GroupNorm statistics of a small crop are not those of a whole frame: the crop-trained
    model scores ~1 dB higher decoded tile by tile than on whole frames, and ~100
    whole-frame steps recover that (docs/design.md).
    """
    ft = v["finetune"]
    return fit(vae, frames, torch.Generator().manual_seed(seed + 1), steps=ft["steps"],
               batch_size=ft["batch_size"], chunk_frames=v["chunk_frames"], crop=0, lr=ft["lr"],
               kl_weight=v["kl_weight"], bf16=False, warmup=1, device=device, desc="vae whole-frame fine-tune")


@torch.no_grad()
def latent_std(vae, frames: torch.Tensor, device: str = "cpu") -> float:
    """Std of the (unscaled) latent mode over all training frames."""
    vae.eval()
    zs = [vae.encode(to_signed(clip).to(device)).latent_dist.mode() for clip in frames]
    return float(torch.cat(zs).std())


def make_vae(params: dict, base: str | Path, clips: str | Path, out: str | Path, metrics: str | Path) -> dict:
    """Train (embedded) or copy (paper) the VAE into `out`; write the metrics JSON."""
    from osv.models import count_parameters, load_vae
    from osv.provenance import record, require_finite_metrics, write_metrics

    v = params["vae"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = training_precision(v, device) if v["steps"] else "fp32"
    vae = load_vae(base).to(device)
    test = load_split_frames(clips, "test", params)
    psnr_init = psnr_db(vae, test, device)
    result = {"psnr_init_db": psnr_init, "steps": v["steps"], "finetune_steps": v["finetune"]["steps"],
              "test_clips": len(test), "parameters": count_parameters(vae)}
    t0 = time.time()
    if v["steps"] == 0:
        with atomic_path(out) as tmp:
            shutil.copytree(Path(base) / "vae", tmp)
        result.update(psnr_test_db=psnr_init, weights=f"copied unchanged from {base}/vae")
    else:
        train = load_split_frames(clips, "train", params)
        history = train_vae(vae, train, v, params["seed"], device, precision)
        if v["finetune"]["steps"]:
            result["psnr_crop_trained_db"] = psnr_db(vae, test, device)
            history += finetune_vae(vae, train, v, params["seed"], device)
        vae.register_to_config(scaling_factor=1.0 / latent_std(vae, train, device))
        result.update(psnr_test_db=psnr_db(vae, test, device), train_mse_last=float(np.mean(history[-50:])),
                      train_clips=len(train), scaling_factor=vae.config.scaling_factor,
                      weights="small VAE built from osv/configs/small_vae.json, trained here")
        require_finite_module("vae", vae, "the trained VAE")
        require_finite_metrics("vae", result, metrics)
        with atomic_path(out) as tmp:
            vae.to("cpu").save_pretrained(tmp)
    result["seconds"] = time.time() - t0
    write_metrics(metrics, result, record(params, "vae", precision=precision, device=device))
    return result


def vae_job(params: dict, base: str, clips: str, out: str, metrics: str) -> dict:
    """The stage's work (module level, so submitit can pickle it): seeded, then make_vae."""
    torch.manual_seed(params["seed"])
    return make_vae(params, base, clips, out, metrics)


def command(args) -> int:
    from osv.launch import run_stage
    from osv.params import load_params

    params = load_params(args.params)
    r = run_stage("vae", vae_job, dict(params=params, base=args.base, clips=args.clips, out=args.out,
                                       metrics=args.metrics), params)
    print(f"osv vae: test PSNR {r['psnr_test_db']:.2f} dB (initial {r['psnr_init_db']:.2f} dB) -> {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("vae", help="train (embedded) or copy (paper) the video VAE; test PSNR")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--base", default="models/base", help="base models, the VAE to start from (default: %(default)s)")
    p.add_argument("--clips", default="data/clips", help="the data stage's clips (default: %(default)s)")
    p.add_argument("--out", default="models/vae", help="output VAE folder (default: %(default)s)")
    p.add_argument("--metrics", default="metrics/vae.json", help="metrics file (default: %(default)s)")
    p.set_defaults(func=command)
