"""`osv generate`: one clip per test clip for one method of eval.methods.

Each clip starts from its test clip's first frame (the stored CLIP embedding and
noise-augmented first-frame latent), with noise from a generator seeded by
(eval.seed, batch index), so a method's videos are the same on every run. Every
sampler's first draw is x_T = sigma_max * eps with that generator and the latents' shape
(the teacher with init_noise="edm"), so sample i of every method starts from the same
noise and the same first frame: the report's teacher-ODE match compares them.
Writes samples/M/clip-XXXX.mp4, meta.json (NFE, seconds per video, seeds, the
hashes of the weights; for a trained student the guidance absorption, see
guidance_absorption) and the previews (preview.gif, contact.png).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from osv import models
from osv.atomic import atomic_path, write_json
from osv.conditioning import from_batch
from osv.fanout import part_range, read_receipts
from osv.hub import link_or_copy, sha256_file
from osv.launch import run_stage, run_stages
from osv.numerics import injected, require_finite
from osv.params import load_params
from osv.provenance import weights_description
from osv.samplers import (
    _randn,
    consistency_sample,
    consistency_sigmas,
    decode_latents,
    guidance_ramp,
    teacher_sample,
    tts_sample,
)
from osv.sde import Denoiser, karras_sigmas, unet_network

UNET_FILE = "diffusion_pytorch_model.safetensors"


def sample(method: dict, denoiser: Denoiser, cond, shape, generator, params: dict):
    """Dispatch to the method's sampler; returns SampleResult(latents, nfe)."""
    sde = params["sde"]
    grid = dict(sigma_min=sde["sigma_min"], sigma_max=sde["sigma_max"], rho=sde["rho"])
    if method["sampler"] == "teacher":  # init "edm": x_T = sigma_max eps, the students' x_T (ODE match)
        return teacher_sample(denoiser, cond, shape, steps=method["steps"], cfg=method.get("cfg", 1.0),
                              generator=generator, init_noise="edm", **grid)
    if method["sampler"] == "consistency":
        return consistency_sample(denoiser, cond, shape, steps=method["steps"], cfg=method.get("cfg"),
                                  generator=generator, num_sigmas=sde["num_sigmas"], **grid)
    return tts_sample(denoiser, cond, shape, generator=generator, third_eval=method.get("tts_third_eval", False),
                      num_sigmas=sde["num_sigmas"], **grid)


def sigma_max_input(shape, generator, params: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, sigma_max): the 1-step consistency sampler's input sigma_max * eps, eps its first draw
    from `generator` (every sampler's first draw; consistency_sample computes x exactly so)."""
    sde = params["sde"]
    grid = karras_sigmas(sde["num_sigmas"], sde["sigma_min"], sde["sigma_max"], sde["rho"])
    sigma = consistency_sigmas(grid, 1)[0].to(torch.float32)
    return sigma.to(device) * _randn(shape, generator, device, torch.float32), sigma


@torch.no_grad()
def guidance_absorption(student: Denoiser, teacher: Denoiser, x: torch.Tensor, sigma, cond, cfg):
    """Per clip (numerator, denominator) of the share of the teacher's CFG shift the student
    reproduces at (x, sigma): <f_theta - D, D^ - D> and ||D^ - D||^2 (float64, summed over each
    clip), D the teacher's conditional (cfg 1) denoiser, D^ = D(c0) + w (D(c) - D(c0)) its guided
    one (Denoiser.guided's formula, so D^ - D = (w - 1)(D(c) - D(c0))), f_theta the student's
    consistency function. The share (ratio of sums) is 0 when the student equals the unguided
    teacher, 1 when it absorbed the guidance. 3 network evaluations: f_theta, D(c), D(c0)."""
    d_cond = teacher.denoise(x, sigma, cond)
    d_uncond = teacher.denoise(x, sigma, cond.uncond())
    w = torch.as_tensor(cfg, dtype=x.dtype, device=x.device)
    w = w.reshape(1, -1, *[1] * (x.ndim - 2)) if w.ndim == 1 else w  # per frame [T]
    shift = ((w - 1) * (d_cond - d_uncond)).double()
    gap = (student.consistency_fn(x, sigma, cond) - d_cond).double()
    return (gap * shift).flatten(1).sum(1), shift.square().flatten(1).sum(1)


def absorption_meta(numerators: list[float], denominators: list[float], sigma: float, acd_cfg: dict) -> dict:
    """meta.json keys: the share over all clips (None when the teacher has no CFG shift), the sums,
    the per-clip terms (the report bootstraps the ratio over clips) and what was measured."""
    num, den = float(sum(numerators)), float(sum(denominators))
    share = num / den if den > 0 and abs(num) < float("inf") else None
    return {"absorption": share, "absorption_sums": {"numerator": num, "denominator": den},
            "absorption_per_clip": {"numerator": numerators, "denominator": denominators},
            "absorption_probe": f"<f_theta - D, D^ - D> / ||D^ - D||^2 at x = sigma_max eps (the 1-step sampler's "
                                f"input, its noise), sigma_max = {sigma:g}, D^ with guidance linspace("
                                f"{acd_cfg['min']:g}, {acd_cfg['max']:g}, frames) (acd.cfg)"}


def batches(params: dict, count: int) -> list[range]:
    """Clip index ranges of the eval.batch_size batches over the first `count` test clips; batch b
    draws its noise from seed eval.seed * 100_003 + b, whichever job samples it."""
    bs = params["eval"]["batch_size"]
    return [range(start, min(start + bs, count)) for start in range(0, count, bs)]


def work_folder(out: str | Path) -> Path:
    """Resumable per-batch work of samples/M: samples.parts/M. Not a declared output, so a failed
    job's batches survive for the rerun; beside samples/, not in it (the report stage depends on
    samples/, which DVC hashes)."""
    out = Path(out)
    return out.parent.with_name(f"{out.parent.name}.parts") / out.name


def receipt_path(out: str | Path, part: int, jobs: int) -> Path:
    return work_folder(out) / f"part-{part:03d}-of-{jobs:03d}.json"


def batch_fingerprint(params: dict, method_name: str, weights: dict, b: int, clip_ids: list[str]) -> str:
    """What batch b's clips depend on: the method's params (osv.dependencies), the weights, its clips."""
    from osv.dependencies import fingerprint

    text = json.dumps({"params": fingerprint(params, "generate", method_name), "weights": weights, "batch": b,
                       "clips": clip_ids}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _batch_done(folder: Path, b: int, fp: str) -> dict | None:
    try:
        record = json.loads((folder / f"batch-{b:05d}.json").read_text())
    except (OSError, ValueError):
        return None
    ok = record.get("fingerprint") == fp and all((folder / f).exists() for f in record["files"])
    return record if ok else None


def generate_part(params: dict, method_name: str, teacher: str, model: str, latents: str, out: str,
                  part: int, jobs: int) -> dict:
    """Job `part` of `jobs`: a contiguous range of batches, each written to samples.parts/M
    (clips, then batch-B.json last) and skipped on a rerun when already there with the same
    fingerprint; then the part's receipt. Module level, so submitit can pickle it."""
    from osv import timing
    from osv.latents import LatentDataset
    from osv.precision import cuda_autocast

    method = params["eval"]["methods"][method_name]
    ev, data = params["eval"], params["data"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = data["resolution"]
    dataset = LatentDataset(latents, "test", res["width"], res["height"])
    count = min(ev["num_clips"], len(dataset))
    plan = batches(params, count)
    mine = part_range(len(plan), part, jobs)
    folder = work_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    receipt_path(out, part, jobs).unlink(missing_ok=True)
    unet_dir = Path(model) / "unet"
    weights = {"unet_sha256": sha256_file(unet_dir / UNET_FILE),
               "teacher_unet_sha256": sha256_file(Path(teacher) / "unet" / UNET_FILE)}
    all_ids = dataset.clip_ids()
    ids = {b: [str(all_ids[i]) for i in plan[b]] for b in mine}
    todo = [b for b in mine if _batch_done(folder, b, batch_fingerprint(params, method_name, weights, b, ids[b]))
            is None]
    if todo:
        _sample_batches(params, method_name, method, teacher, unet_dir, dataset, plan, todo, ids, weights, folder,
                        device, out)
    records = [_batch_done(folder, b, batch_fingerprint(params, method_name, weights, b, ids[b])) for b in mine]
    receipt = {"part": part, "jobs": jobs, "batches": [b for b in mine], "count": count, "device": device,
               "precision": cuda_autocast(device)[1], "sampled": len(todo), "reused": len(mine) - len(todo),
               **weights, "records": records, "timing": timing.measure()}
    write_json(receipt_path(out, part, jobs), receipt)
    return {k: receipt[k] for k in ("part", "jobs", "sampled", "reused", "device")}


# what a finished job leaves (osv.launch reuses a completed job only while it exists)
generate_part.outputs = lambda out, part, jobs, **_: [receipt_path(out, part, jobs)]


def _sample_batches(params, method_name, method, teacher, unet_dir, dataset, plan, todo, ids, weights, folder,
                    device, out) -> None:
    from osv.precision import cuda_autocast
    from osv.video import tensor_to_uint8, write_mp4

    ev, data = params["eval"], params["data"]
    unet = models.load_unet(unet_dir).to(device).eval()
    vae = models.load_vae(teacher).to(device).eval()
    denoiser = Denoiser(unet_network(unet), sigma_min=params["sde"]["sigma_min"],
                        boundary="approx" if method["model"] == "teacher" else params["student"]["boundary"])
    # A trained student: how much of the teacher's guidance it absorbed (guidance_absorption).
    probe = None if method["model"] == "teacher" else \
        Denoiser(unet_network(models.load_unet(teacher).to(device).eval()), sigma_min=params["sde"]["sigma_min"])
    acd_cfg = params["acd"]["cfg"]
    guidance = guidance_ramp(acd_cfg["max"], data["frames"], acd_cfg["min"])
    for b in tqdm(todo, desc=f"generate {method_name}", unit="batch"):
        items = [dataset[i] for i in plan[b]]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("latents", "cond_latents", "image_embeds")}
        cond = from_batch(batch, params, device=device)
        batch_seed = ev["seed"] * 100_003 + b  # the same for every method: sample i of each starts alike
        generator = torch.Generator(device).manual_seed(batch_seed)
        autocast, _ = cuda_autocast(device)
        t0 = time.perf_counter()
        with autocast:
            result = sample(method, denoiser, cond, batch["latents"].shape, generator, params)
            require_finite("generate", {"latents": result.latents * injected("generate", b)}, step=b,
                           hint=f"clips {ids[b]}; {out} not written")
            frames = decode_latents(vae, result.latents, chunk=data["frames"])
        seconds = time.perf_counter() - t0
        files = [f"clip-{i:04d}.mp4" for i in plan[b]]
        for name, clip in zip(files, frames):
            write_mp4(folder / name, tensor_to_uint8(clip.float()), data["fps"])
        record = {"batch": b, "clip_ids": ids[b], "files": files, "nfe": result.nfe, "seconds": seconds,
                  "fingerprint": batch_fingerprint(params, method_name, weights, b, ids[b])}
        if probe is not None:  # not timed: no part of sampling
            x, sigma = sigma_max_input(batch["latents"].shape, torch.Generator(device).manual_seed(batch_seed),
                                       params, device)
            num, den = guidance_absorption(denoiser, probe, x, sigma, cond, guidance)
            record.update(absorption_num=num.tolist(), absorption_den=den.tolist(), probe_sigma=float(sigma))
        write_json(folder / f"batch-{b:05d}.json", record)  # last: the batch is complete


def gather(params: dict, method_name: str, model: str, out: str, jobs: int) -> dict:
    """samples/M from the parts' batches: the clips (hard links), meta.json and the previews,
    renamed into place at once. Its timing record sums the parts'."""
    from osv import timing
    from osv.eval.previews import make_previews

    method = params["eval"]["methods"][method_name]
    ev, data, res = params["eval"], params["data"], params["data"]["resolution"]
    receipts = read_receipts([receipt_path(out, k, jobs) for k in range(jobs)], "generate",
                             f"osv generate --method {method_name}")
    records = sorted((r for rec in receipts for r in rec["records"]), key=lambda r: r["batch"])
    count = receipts[0]["count"]
    if [r["batch"] for r in records] != list(range(len(batches(params, count)))):
        raise ValueError(f"{work_folder(out)}: the receipts of {jobs} jobs do not hold every batch: rerun the parts")
    nfe = sorted({r["nfe"] for r in records})
    first = receipts[0]
    meta = {"method": method_name, **method, "clips": count, "frames": data["frames"], "fps": data["fps"],
            "resolution": [res["width"], res["height"]], "seed": ev["seed"], "batch_size": ev["batch_size"],
            "unet_sha256": first["unet_sha256"], "model": str(model), "teacher_unet_sha256": first["teacher_unet_sha256"],
            "weights": weights_description(params), "device": first["device"], "precision": first["precision"],
            "jobs": jobs, "nfe": nfe[0] if len(nfe) == 1 else nfe,
            "sec_per_video": sum(r["seconds"] for r in records) / max(count, 1),
            "clip_ids": [c for r in records for c in r["clip_ids"]]}
    if method["model"] != "teacher":
        meta.update(absorption_meta([x for r in records for x in r["absorption_num"]],
                                    [x for r in records for x in r["absorption_den"]],
                                    records[0]["probe_sigma"], params["acd"]["cfg"]))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for r in records:
            for name in r["files"]:
                link_or_copy(work_folder(out) / name, tmp / name)
        write_json(tmp / "meta.json", meta)
        make_previews(tmp)
    timing.record_parts("generate", out, [r["timing"] for r in receipts])
    absorbed = f", guidance absorption {meta['absorption']:.3f}" if meta.get("absorption") is not None else ""
    print(f"[osv generate] {method_name}: {count} clips, NFE {meta['nfe']}, {meta['sec_per_video']:.3f} s/video"
          f"{absorbed}")
    return meta


def generate(params: dict, method_name: str, teacher: str, model: str, latents: str, out: str,
             jobs: int = 1) -> dict:
    """Every part in this process, then samples/M."""
    for part in range(jobs):
        generate_part(params, method_name, teacher, model, latents, out, part, jobs)
    return gather(params, method_name, model, out, jobs)


def command(args) -> int:
    from osv.params import resources_for

    params = load_params(args.params)
    if args.method not in params["eval"]["methods"]:
        raise SystemExit(f"osv generate: unknown method {args.method!r} (eval.methods: {sorted(params['eval']['methods'])})")
    # the DAG's paths, from the method (the flags override them)
    args.model = args.model or f"models/{params['eval']['methods'][args.method]['model']}"
    args.out = args.out or f"samples/{args.method}"
    jobs = resources_for(params, "generate")["jobs"]
    if args.part is not None and not 0 <= args.part < jobs:
        raise SystemExit(f"osv generate: --part {args.part} is not in 0..{jobs - 1} (resources.generate.jobs = {jobs})")
    if not args.gather:
        for path in (args.teacher, args.model, args.latents):
            if not Path(path).exists():
                raise SystemExit(f"osv generate: {path} does not exist")
    common = dict(params=params, method_name=args.method, teacher=args.teacher, model=args.model,
                  latents=args.latents, out=args.out, jobs=jobs)
    if args.part is not None:  # one job of the fan-out (Snakemake's generate_part rule)
        run_stage("generate", generate_part, {**common, "part": args.part}, params)
        return 0
    if not args.gather:  # every part, submitted at once (dvc repro, or by hand)
        run_stages("generate", generate_part, [{**common, "part": k} for k in range(jobs)], params)
    gather(params, args.method, args.model, args.out, jobs)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample the test set for one method of eval.methods")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--method", required=True, help="a method of eval.methods")
    p.add_argument("--teacher", default="models/teacher", help="teacher pipeline folder (its VAE decodes; default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="the sampled model's folder (default: models/<eval.methods.METHOD.model>, i.e. models/teacher or models/RUN)")
    p.add_argument("--latents", default="data/latents", help="latent folder (default: %(default)s)")
    p.add_argument("--out", default=None, help="samples folder (default: samples/METHOD)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--part", type=int, default=None,
                     help="sample only job PART (0-based) of resources.generate.jobs into samples.parts/METHOD "
                          "(default: every part, then the samples folder)")
    how.add_argument("--gather", action="store_true", help="only assemble the samples folder from the parts")
    p.set_defaults(func=command)
