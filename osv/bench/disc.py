"""`osv bench disc`: cost of one discriminator + generator iteration, latent upsampler vs VAE decoder.

One iteration (method.md §3, alternating updates): a student forward gives the fake
latents; D step = D(real), D(fake.detach()), hinge, backward, Adam step on D;
G step = D(fake), generator loss, backward through D (its own parameters frozen for
that pass) into the student's LoRA, Adam step. Both front ends run the same
student and backbone; only the path latents -> pixels differs. The paper reports
4.29 s (VAE decoder) vs 2.61 s (latent upsampler), 1.64x, on an H800 at 512x512.

Each front end is measured in a fresh spawned process (unless --no-isolate), so
peak memory is its own: torch.cuda.max_memory_allocated on a GPU; on the CPU the
process's peak resident set size (resource.getrusage ru_maxrss), reported whole
and above the RSS the process had before building any model.

--shape embedded uses the small models of osv/configs and params.yaml's disc
section; --shape svd builds DINOv2-small, the SVD VAE and the SVD img2vid UNet
from their default configs with random weights (timing and memory do not depend on
the weights), with the disc section of a paper-scale params file or, if the
params are embedded-scale, SVD_DISC below.
"""

from __future__ import annotations

import json
import time

from osv.bench.sample import DTYPES
from osv.models import DINOV2_SMALL, SVD_VAE

# Paper-scale discriminator for --shape svd when the params file is embedded-scale.
SVD_DISC = {"upsample_factor": 4, "backbone_input": 224, "layers": [2, 5, 8, 11], "head_channels": 128}
SVD_LORA_RANK = 64
PAPER = "paper (H800, 512x512): VAE decoder 4.29 s/iter vs latent upsampler 2.61 s/iter = 1.64x"


def add_args(parser) -> None:
    if "--params" not in parser._option_string_actions:
        parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--shape", choices=["embedded", "svd"], default="embedded",
                        help="embedded = small models of osv/configs; svd = real SVD/DINOv2-small shapes")
    parser.add_argument("--width", type=int, default=None, help="pixels (default data.resolution; svd 512)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default data.resolution; svd 512)")
    parser.add_argument("--frames", type=int, default=None, help="T (default data.frames; svd 14)")
    parser.add_argument("--batch", type=int, default=1, help="videos per iteration [paper: 1 per GPU]")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="autocast dtype of the forward passes (weights stay fp32)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per front end")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--front-ends", default="latent,vae", help="comma list of latent, vae")
    parser.add_argument("--no-isolate", action="store_true",
                        help="measure in this process (peak memory then accumulates across front ends)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")


def bench_config(args, params: dict) -> dict:
    """Everything a measuring process needs, as plain data (it crosses a spawn)."""
    import torch

    svd = args.shape == "svd"
    disc = dict(params["disc"])
    rank = params["student"]["lora_rank"]
    if svd and params["scale"] != "paper":
        disc.update(SVD_DISC)
        rank = SVD_LORA_RANK
    width = args.width or (512 if svd else params["data"]["resolution"]["width"])
    height = args.height or (512 if svd else params["data"]["resolution"]["height"])
    multiple = 64 if svd else 16  # the UNet halves the latent (pixels / 8) once per down block but the last
    if width % multiple or height % multiple:
        raise ValueError(f"--width {width} / --height {height}: both must be multiples of {multiple} "
                         f"for the {args.shape} UNet")
    return {
        "shape": args.shape, "width": width, "height": height,
        "frames": args.frames or (14 if svd else params["data"]["frames"]), "batch": args.batch,
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "dtype": args.dtype,
        "iters": args.iters, "warmup": args.warmup, "disc": disc, "lora_rank": rank,
        "lora_targets": params["student"]["lora_targets"], "lr": params["lgp"]["lr"],
        "lr_disc": params["lgp"]["lr_disc"], "generator_loss": params["lgp"]["generator_loss"],
        "seed": params["seed"],
    }


def build_models(cfg: dict, front_end: str):
    """Student (LoRA on the SVD UNet), discriminator, and the student's conditioning inputs."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import Dinov2Config, Dinov2Model

    from osv import models
    from osv.discriminator import Discriminator
    from osv.student import make_student

    torch.manual_seed(cfg["seed"])
    with torch.device(cfg["device"]):  # random init directly on the device (the SVD UNet is 1.5B params)
        if cfg["shape"] == "svd":
            unet = UNetSpatioTemporalConditionModel(num_frames=cfg["frames"])
            backbone = Dinov2Model(Dinov2Config(**DINOV2_SMALL))
            vae = AutoencoderKLTemporalDecoder(**SVD_VAE) if front_end == "vae" else None
        else:
            unet = models.build_small_unet(cfg["seed"], cfg["frames"])
            backbone = models.build_small_dinov2(cfg["seed"])
            vae = models.build_small_vae(cfg["seed"]) if front_end == "vae" else None
    student = make_student(unet, cfg["lora_rank"], cfg["lora_targets"]).train()
    params = {"disc": {**cfg["disc"], "front_end": front_end}}
    disc = Discriminator.from_params(params, backbone, vae).to(cfg["device"]).train()
    return student, disc


def make_batch(cfg: dict, student):
    """Random real latents and the student's inputs: noisy latents ++ cond latents, CLIP embeds, time ids."""
    import torch

    b, t, dev = cfg["batch"], cfg["frames"], cfg["device"]
    h, w = cfg["height"] // 8, cfg["width"] // 8
    uc = student.config
    return {
        "real": torch.randn(b, t, 4, h, w, device=dev),
        "sample": torch.cat([torch.randn(b, t, 4, h, w, device=dev),
                             torch.randn(b, 1, 4, h, w, device=dev).expand(b, t, 4, h, w)], dim=2),
        "timestep": torch.full((b,), 0.25, device=dev),
        "encoder_hidden_states": torch.randn(b, 1, uc.cross_attention_dim, device=dev),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]], device=dev).expand(b, 3),
    }


def iteration(student, disc, opt_g, opt_d, batch: dict, autocast, kind: str) -> None:
    from osv.losses import d_hinge_loss, g_loss

    with autocast():
        fake = student(batch["sample"], batch["timestep"], batch["encoder_hidden_states"],
                       batch["added_time_ids"]).sample
        loss_d = d_hinge_loss(disc(batch["real"]), disc(fake.detach()))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    for p in disc.trainable_parameters():  # the G step trains the student only
        p.requires_grad_(False)
    with autocast():
        loss_g = g_loss(disc(fake), kind)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    for p in disc.trainable_parameters():
        p.requires_grad_(True)


def measure(cfg: dict, front_end: str) -> dict:
    """Seconds per iteration and peak memory of one front end (module level: runs in a spawned process)."""
    import contextlib
    import functools
    import resource

    import torch

    from osv.student import trainable_parameters

    cuda = cfg["device"].startswith("cuda")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats(cfg["device"])
    student, disc = build_models(cfg, front_end)
    opt_g = torch.optim.Adam(trainable_parameters(student), lr=cfg["lr"])
    opt_d = torch.optim.Adam(disc.trainable_parameters(), lr=cfg["lr_disc"])
    batch = make_batch(cfg, student)
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    autocast = (contextlib.nullcontext if cfg["dtype"] == "fp32" else
                functools.partial(torch.autocast, device_type=torch.device(cfg["device"]).type, dtype=dtype))
    sync = (lambda: torch.cuda.synchronize(cfg["device"])) if cuda else (lambda: None)
    for _ in range(cfg["warmup"]):
        iteration(student, disc, opt_g, opt_d, batch, autocast, cfg["generator_loss"])
    sync()
    start = time.perf_counter()
    for _ in range(cfg["iters"]):
        iteration(student, disc, opt_g, opt_d, batch, autocast, cfg["generator_loss"])
    sync()
    seconds = (time.perf_counter() - start) / cfg["iters"]
    out = {"front_end": front_end, "sec_per_iter": seconds,
           "disc_trainable_params": sum(p.numel() for p in disc.trainable_parameters())}
    if cuda:
        out.update(peak_gib=torch.cuda.max_memory_allocated(cfg["device"]) / 2**30,
                   memory="torch.cuda.max_memory_allocated")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out.update(peak_gib=rss / 2**20, peak_above_start_gib=(rss - rss0) / 2**20,
                   memory="peak RSS of the process (getrusage ru_maxrss)")
    return out


def measure_isolated(cfg: dict, front_end: str) -> dict:
    """measure() in a fresh `python -m osv.bench.disc` process (no re-import of the caller's __main__)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="osv-bench-disc-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "osv.bench.disc", json.dumps(cfg), front_end, str(result)]
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"osv bench disc: measuring the {front_end} front end failed "
                               f"(exit code {proc.returncode}; its error is printed above)")
        return json.loads(result.read_text())


def format_table(cfg: dict, rows: list[dict]) -> str:
    lines = [f"osv bench disc: shape={cfg['shape']} {cfg['width']}x{cfg['height']} T={cfg['frames']} "
             f"batch={cfg['batch']} device={cfg['device']} dtype={cfg['dtype']} iters={cfg['iters']} "
             f"(+{cfg['warmup']} warmup) backbone_input={cfg['disc']['backbone_input']} "
             f"layers={cfg['disc']['layers']} lora_rank={cfg['lora_rank']}",
             f"{'front end':<10} {'s/iter':>10} {'peak GiB':>10} {'above start GiB':>16} {'D trainable':>12}"]
    for r in rows:
        above = f"{r['peak_above_start_gib']:.3f}" if "peak_above_start_gib" in r else "-"
        lines.append(f"{r['front_end']:<10} {r['sec_per_iter']:>10.4f} {r['peak_gib']:>10.3f} {above:>16} "
                     f"{r['disc_trainable_params']:>12,}")
    lines.append(f"memory: {rows[0]['memory']}")
    by = {r["front_end"]: r for r in rows}
    if {"latent", "vae"} <= set(by):
        lines.append(f"ratio vae/latent: time {ratios(by)['time']:.2f}x, peak memory {ratios(by)['memory']:.2f}x")
    lines.append(PAPER)
    return "\n".join(lines)


def ratios(by: dict) -> dict:
    return {"time": by["vae"]["sec_per_iter"] / by["latent"]["sec_per_iter"],
            "memory": by["vae"]["peak_gib"] / by["latent"]["peak_gib"]}


def run(args) -> int:
    from osv.atomic import write_json
    from osv.params import load_params

    params = load_params(args.params)
    cfg = bench_config(args, params)
    front_ends = [f.strip() for f in args.front_ends.split(",") if f.strip()]
    bad = [f for f in front_ends if f not in ("latent", "vae")]
    if bad or not front_ends:
        raise ValueError(f"--front-ends: unknown {bad} (use latent, vae)")
    if cfg["iters"] < 1 or cfg["warmup"] < 0:
        raise ValueError(f"--iters must be >= 1 and --warmup >= 0, got {cfg['iters']}, {cfg['warmup']}")
    rows = []
    for fe in front_ends:
        print(f"osv bench disc: measuring {fe} front end ...", flush=True)
        rows.append(measure(cfg, fe) if args.no_isolate else measure_isolated(cfg, fe))
    print(format_table(cfg, rows))
    if args.out:
        by = {r["front_end"]: r for r in rows}
        result = {"config": cfg, "results": rows, "paper": PAPER,
                  "ratio_vae_over_latent": ratios(by) if {"latent", "vae"} <= set(by) else None}
        write_json(args.out, result)
    return 0


if __name__ == "__main__":  # the isolated measuring process: argv = config JSON, front end, result path
    import sys
    from pathlib import Path

    Path(sys.argv[3]).write_text(json.dumps(measure(json.loads(sys.argv[1]), sys.argv[2])))
