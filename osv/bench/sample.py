"""`osv bench sample`: seconds per video (sampling + chunked VAE decoding) and NFE, teacher vs student.

Methods: the SVD teacher (Euler, CFG ramp, default 25 steps = 50 NFE) and the student's
consistency sampler at 1, 2, 4, 8 steps plus 1 step + TTS (NFE 2). Student and teacher
share one architecture, so one randomly initialised UNet serves for both: the time of
a network evaluation does not depend on the weights, only on shapes, dtype and device.

--shape embedded uses the small UNet/VAE of osv/configs at params.yaml's data size;
--shape svd builds SVD img2vid's UNet and VAE from their diffusers configs (random
init, 14 frames, 1024x576 by default), meant for a GPU (--device cuda --dtype fp16).
"""

from __future__ import annotations

import statistics
import time

from osv.models import SVD_VAE  # the UNet's is diffusers' default config, num_frames 14

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_args(parser) -> None:
    if "--params" not in parser._option_string_actions:
        parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--shape", choices=["embedded", "svd"], default="embedded",
                        help="embedded = small models of osv/configs; svd = SVD img2vid UNet/VAE shapes")
    parser.add_argument("--width", type=int, default=None, help="pixels (default data.resolution; svd 1024)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default data.resolution; svd 576)")
    parser.add_argument("--frames", type=int, default=None, help="T (default data.frames; svd 14)")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="UNet/VAE weights dtype")
    parser.add_argument("--teacher-steps", type=int, default=25, help="teacher Euler steps (paper: 25)")
    parser.add_argument("--cfg", type=float, default=3.0, help="teacher max guidance (ramp from 1.0)")
    parser.add_argument("--student-steps", default="1,2,4,8", help="comma list of consistency steps")
    parser.add_argument("--decode-chunk", type=int, default=None, help="frames per VAE decode (default all)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed 1-step runs first")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")


def bench_config(args, params: dict) -> dict:
    import torch

    svd = args.shape == "svd"
    width = args.width or (1024 if svd else params["data"]["resolution"]["width"])
    height = args.height or (576 if svd else params["data"]["resolution"]["height"])
    multiple = 64 if svd else 16  # pixels / 8 must halve once per UNet down block but the last
    if width % multiple or height % multiple:
        raise ValueError(f"--width {width} / --height {height}: both must be multiples of {multiple} "
                         f"for the {args.shape} UNet")
    steps = [int(s) for s in args.student_steps.split(",") if s.strip()]
    if not steps or min(steps) < 1 or args.teacher_steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--student-steps, --teacher-steps and --repeats must be >= 1, --warmup >= 0")
    sde = params["sde"]
    return {
        "shape": args.shape, "width": width, "height": height,
        "frames": args.frames or (14 if svd else params["data"]["frames"]),
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "dtype": args.dtype,
        "teacher_steps": args.teacher_steps, "cfg": args.cfg, "student_steps": steps,
        "decode_chunk": args.decode_chunk, "repeats": args.repeats, "warmup": args.warmup,
        "sde": {k: sde[k] for k in ("num_sigmas", "sigma_min", "sigma_max", "rho")},
        "fps": params["data"]["fps"], "conditioning": dict(params["conditioning"]), "seed": params["seed"],
    }


def build_models(cfg: dict):
    """(unet, vae) with random weights on the device, in the requested dtype."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    from osv import models

    torch.manual_seed(cfg["seed"])
    with torch.device(cfg["device"]):  # init directly on the device (the SVD UNet is 1.5B parameters)
        if cfg["shape"] == "svd":
            unet = UNetSpatioTemporalConditionModel(num_frames=cfg["frames"])
            vae = AutoencoderKLTemporalDecoder(**SVD_VAE)
        else:
            unet = models.build_small_unet(cfg["seed"], cfg["frames"])
            vae = models.build_small_vae(cfg["seed"])
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    if dtype != torch.float32:  # built in fp32; cast only when asked (diffusers warns on any .to(dtype))
        unet, vae = unet.to(dtype), vae.to(dtype)
    return unet.eval(), vae.eval()


def random_condition(cfg: dict, unet):
    """A conditioning of the right shapes (its values do not change the timing)."""
    import torch

    from osv.conditioning import SVDConditioning, make_added_time_ids

    g = torch.Generator().manual_seed(cfg["seed"])
    h, w = cfg["height"] // 8, cfg["width"] // 8
    c = cfg["conditioning"]
    cond = SVDConditioning(torch.randn(1, 1, unet.config.cross_attention_dim, generator=g),
                           torch.randn(1, 4, h, w, generator=g),
                           make_added_time_ids(cfg["fps"], c["motion_bucket_id"], c["noise_aug_strength"], 1))
    return cond.to(device=cfg["device"])


def methods(cfg: dict) -> list[tuple[str, int, dict]]:
    """(name, steps, sampler call) rows: the teacher first (the speed-up reference)."""
    rows = [(f"teacher CFG {cfg['cfg']:.1f}", cfg["teacher_steps"], {"kind": "teacher"})]
    for k in cfg["student_steps"]:
        rows.append((f"student {k} step{'s' if k > 1 else ''}", k, {"kind": "consistency"}))
        if k == 1:
            rows.append(("student 1 step + TTS", 1, {"kind": "tts"}))
    return rows


def sample_once(cfg: dict, denoiser, cond, kind: str, steps: int, generator):
    from osv.samplers import consistency_sample, teacher_sample, tts_sample

    shape = (1, cfg["frames"], 4, cfg["height"] // 8, cfg["width"] // 8)
    sde = cfg["sde"]
    karras = dict(sigma_min=sde["sigma_min"], sigma_max=sde["sigma_max"], rho=sde["rho"])
    if kind == "teacher":
        return teacher_sample(denoiser, cond, shape, steps=steps, cfg=cfg["cfg"], generator=generator, **karras)
    if kind == "tts":
        return tts_sample(denoiser, cond, shape, generator=generator, num_sigmas=sde["num_sigmas"], **karras)
    return consistency_sample(denoiser, cond, shape, steps=steps, generator=generator,
                              num_sigmas=sde["num_sigmas"], **karras)


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_method(cfg: dict, denoiser, vae, cond, kind: str, steps: int) -> dict:
    """Median seconds of sampling and of decoding over cfg['repeats'] runs, and the NFE."""
    import torch

    from osv.samplers import decode_latents

    sample_s, decode_s, nfe = [], [], None
    for r in range(cfg["repeats"]):
        gen = torch.Generator().manual_seed(cfg["seed"] + r)
        _sync(cfg["device"])
        t0 = time.perf_counter()
        result = sample_once(cfg, denoiser, cond, kind, steps, gen)
        _sync(cfg["device"])
        t1 = time.perf_counter()
        decode_latents(vae, result.latents, cfg["decode_chunk"])
        _sync(cfg["device"])
        sample_s.append(t1 - t0)
        decode_s.append(time.perf_counter() - t1)
        nfe = result.nfe
    sample, decode = statistics.median(sample_s), statistics.median(decode_s)
    return {"sample_s": sample, "decode_s": decode, "sec_per_video": sample + decode, "nfe": nfe}


def measure(cfg: dict) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from osv.sde import Denoiser

    unet, vae = build_models(cfg)
    cond = random_condition(cfg, unet)
    denoiser = Denoiser(unet, sigma_min=cfg["sde"]["sigma_min"])
    rows = methods(cfg)
    with torch.no_grad():
        for _ in range(cfg["warmup"]):  # first calls pay for lazy initialisation (kernels, allocator)
            time_method({**cfg, "repeats": 1}, denoiser, vae, cond, "consistency", 1)
        results = []
        for name, steps, call in tqdm(rows, desc="bench sample"):
            results.append({"method": name, "sampler": call["kind"], "steps": steps,
                            **time_method(cfg, denoiser, vae, cond, call["kind"], steps)})
    teacher = results[0]["sec_per_video"]
    for row in results:
        row["speedup"] = teacher / row["sec_per_video"]
    return results


def format_table(cfg: dict, rows: list[dict]) -> str:
    models = ("SVD img2vid UNet + VAE shapes from diffusers configs" if cfg["shape"] == "svd"
              else "small UNet/VAE of osv/configs")
    head = (f"osv bench sample: {models}, RANDOM weights (a network evaluation costs the same whatever "
            f"the weights)\n{cfg['frames']} frames {cfg['width']}x{cfg['height']}, {cfg['device']} {cfg['dtype']}, "
            f"batch 1, VAE decode chunk {cfg['decode_chunk'] or 'all'} frames, median of {cfg['repeats']} runs; "
            "NFE counted by the Denoiser (CFG = 2 per step)")
    lines = [head, f"{'method':<24}{'steps':>6}{'NFE':>6}{'sample s':>11}{'decode s':>11}{'s/video':>11}{'speed-up':>10}"]
    for r in rows:
        lines.append(f"{r['method']:<24}{r['steps']:>6}{r['nfe']:>6}{r['sample_s']:>11.4f}{r['decode_s']:>11.4f}"
                     f"{r['sec_per_video']:>11.4f}{r['speedup']:>9.1f}x")
    return "\n".join(lines)


def run(args) -> int:
    from osv.atomic import write_json
    from osv.params import load_params

    params = load_params(args.params)
    cfg = bench_config(args, params)
    rows = measure(cfg)
    print(format_table(cfg, rows))
    if args.out:
        write_json(args.out, {"config": cfg, "results": rows, "random_weights": True})
    return 0
