"""`osv bench vae`: seconds per training step of the embedded VAE recipe, and where they go.

Times the two steps `osv vae` makes (vae.batch_size crops of vae.crop pixels; vae.finetune.batch_size
whole frames) on the small VAE of osv/configs with its identity start, on random frames with the
data's shape (the cost does not depend on the pixels). Each is timed with the decoder's temporal
(3, 1, 1) convolutions as osv.models runs them (Conv2d over [B, C, T, H·W]) and as stock diffusers
does (Conv3d, torch's slow_conv3d path on CPU), and a profile of the crop step groups its time
by operator. The estimate of the stage is steps x s/step; the PSNR passes add a few seconds.
"""

from __future__ import annotations

import json
import statistics
import time

import torch


def add_args(parser) -> None:
    if "--params" not in parser._option_string_actions:
        parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case (median; default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default resources.vae)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _stock_temporal_convs(vae):
    """The VAE as stock diffusers runs it: its temporal convolutions back to Conv3d."""
    from osv.models import TemporalConv

    for m in vae.modules():
        if isinstance(m, TemporalConv):
            m.__class__ = torch.nn.Conv3d
    return vae


def _step_seconds(vae, frames, v: dict, batch_size: int, crop: int, steps: int) -> float:
    from osv.vae import init_for_training, sample_batch, vae_loss

    init_for_training(vae)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4, foreach=True)
    gen, times = torch.Generator().manual_seed(0), []
    for _ in range(steps + 2):  # two untimed warm-up steps
        x, num_frames = sample_batch(frames, batch_size, v["chunk_frames"], crop, gen)
        start = time.perf_counter()
        loss, _ = vae_loss(vae, x, num_frames, v["kl_weight"], bf16=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def _profile(vae, frames, v: dict) -> list[tuple[str, float]]:
    """Share of a crop step's operator time per operator (top 8)."""
    from torch.profiler import profile

    from osv.vae import init_for_training, sample_batch, vae_loss

    init_for_training(vae)
    x, num_frames = sample_batch(frames, v["batch_size"], v["chunk_frames"], v["crop"], torch.Generator().manual_seed(0))
    with profile() as prof:
        vae_loss(vae, x, num_frames, v["kl_weight"], bf16=False)[0].backward()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return [(e.key, e.self_cpu_time_total / total) for e in top]


def run(args) -> int:
    from osv.models import build_small_vae
    from osv.params import load_params, resources_for

    params = load_params(args.params)
    v, d = params["vae"], params["data"]
    torch.set_num_threads(args.threads or resources_for(params, "vae")["cpus_per_task"])
    w, h = d["resolution"]["width"], d["resolution"]["height"]
    frames = torch.randint(0, 256, (8, d["frames"], 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seed = params["weights"]["config_seed"]
    cases = {"crop": (v["batch_size"], v["crop"], v["steps"]),
             "whole-frame fine-tune": (v["finetune"]["batch_size"], 0, v["finetune"]["steps"])}
    rows = []
    for name, (batch, crop, steps) in cases.items():
        fast = _step_seconds(build_small_vae(seed), frames, v, batch, crop, args.steps)
        stock = _step_seconds(_stock_temporal_convs(build_small_vae(seed)), frames, v, batch, crop, args.steps)
        rows.append({"step": name, "batch": batch, "crop": crop or f"{w}x{h}", "steps": steps,
                     "s_per_step": fast, "s_per_step_conv3d": stock, "stage_s": fast * steps})
    result = {"threads": torch.get_num_threads(), "steps": rows,
              "profile_crop_step": _profile(build_small_vae(seed), frames, v)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"osv vae training steps ({result['threads']} threads, fp32, {d['frames']} frames at {w}x{h}):")
    print("| step | batch | crop | s/step | s/step, stock Conv3d | steps | stage s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['batch']} | {r['crop']} | {r['s_per_step']:.3f} | {r['s_per_step_conv3d']:.3f} "
              f"| {r['steps']} | {r['stage_s']:.0f} |")
    print("crop step, share of operator time: "
          + ", ".join(f"{k} {share:.0%}" for k, share in result["profile_crop_step"]))
    return 0
