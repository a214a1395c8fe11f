"""`osv train`: one training run of train.runs, stage 1 (LGP) or stage 2 (ACD) (method.md §3-4).

Four networks: the student θ (the teacher UNet + LoRA, plus unfrozen layers in stage 2), its
EMA θ⁻ (a copy of the trainable tensors only, swapped in for the target forward), the frozen
teacher φ (stage 2) and the discriminator ψ (frozen DINOv2 + trainable upsampler and heads).
Each iteration: one discriminator step, one student step, one EMA update, on the (real, fake,
distance) of the stage's objective (osv.train.objectives):

  D: hinge(D(real), D(fake.detach()));  G: λ_adv·g_loss(D(fake)) + mean distance.

λ_adv = 0 builds no discriminator at all (ablation d). Stage 1 keeps an EMA too (decay
lgp.ema_decay), so that stage 2 starts from stage 1's student, EMA and discriminator.

Randomness of iteration `step` comes from generators seeded by (seed, step, global sample
index) (osv.train.loop), so resume is exact and the global batch splits over ranks freely.
Test hooks (environment): OSV_INJECT_NAN=train:k makes the generator loss of iteration k NaN;
OSV_SIGNAL_AT_STEP=k makes the process send itself SIGTERM before iteration k (checkpoint + stop).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SIGNAL_AT_ENV = "OSV_SIGNAL_AT_STEP"


@dataclass
class Nets:
    student: torch.nn.Module  # UNet with LoRA (peft, injected in place)
    student_fn: object  # osv.sde.Denoiser around the (maybe compiled) student
    trainable: dict[str, torch.nn.Parameter]  # name -> LoRA / unfrozen parameter
    ema: dict[str, torch.Tensor]  # θ⁻, same names
    teacher_fn: object | None = None  # frozen teacher Denoiser (ACD)
    disc: torch.nn.Module | None = None


@dataclass
class State:
    step: int = 0
    opt_g: torch.optim.Optimizer | None = None
    opt_d: torch.optim.Optimizer | None = None
    last_checkpoint: Path | None = None
    data_order: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- setup


def build_nets(params: dict, stage: str, spec: dict, teacher, init, dinov2, device) -> Nets:
    """Student (fresh LoRA or the init run's), EMA, frozen teacher (ACD) and discriminator."""
    from osv.models import load_unet
    from osv.sde import Denoiser
    from osv.student import enable_gradient_checkpointing, load_trainable_state_dict, make_student, unfreeze
    from osv.train.export import load_export

    cfg, st, sigma_min = params[stage], params["student"], params["sde"]["sigma_min"]
    student = make_student(load_unet(teacher), st["lora_rank"], st["lora_targets"])
    if stage == "acd":
        unfreeze(student, st["unfreeze"])
    if params["train"]["grad_checkpointing"]:
        enable_gradient_checkpointing(student)  # diffusers' + the temporal blocks it skips
    exported = load_export(init) if spec["init"] != "teacher" else None
    if exported is not None:
        load_trainable_state_dict(student, exported["student"], strict=False)  # stage 1 has no unfrozen layers
    student.to(device).train()
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    ema = {n: p.detach().clone() for n, p in trainable.items()}
    if exported is not None:
        for n, v in exported["ema"].items():
            if n in ema:
                ema[n].copy_(v)
    network = torch.compile(student) if params["train"]["compile"] else student
    nets = Nets(student, Denoiser(network, boundary=st["boundary"], sigma_min=sigma_min), trainable, ema)
    if stage == "acd":  # the teacher is a diffusion model, not a consistency function: SVD's approximate form
        teacher_unet = load_unet(teacher).to(device=device, dtype=teacher_dtype(params, device))
        teacher_unet.eval().requires_grad_(False)
        nets.teacher_fn = Denoiser(teacher_unet, sigma_min=sigma_min)
    if cfg["lambda_adv"] > 0:
        nets.disc = build_discriminator(params, teacher, dinov2, device,
                                        exported["disc"] if exported is not None else None)
    return nets


def teacher_dtype(params: dict, device) -> torch.dtype:
    """The frozen teacher's weights: on CUDA the autocast dtype of train.precision (it only runs
    under autocast, which casts its matmul/conv weights to that dtype anyway; half the memory of
    a second fp32 UNet), else fp32 (CPU runs fp32)."""
    from osv.train.loop import Precision

    return Precision(params["train"]["precision"], torch.device(device)).dtype or torch.float32


def build_discriminator(params: dict, teacher, dinov2, device, state: dict | None):
    from osv.discriminator import Discriminator
    from osv.models import load_vae

    folder = Path(dinov2) if dinov2 else Path(teacher) / "dinov2"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no DINOv2 folder for the discriminator (osv teacher copies "
                                "models/base/dinov2 into models/teacher; or pass --dinov2)")
    vae = load_vae(teacher) if params["disc"]["front_end"] == "vae" else None
    disc = Discriminator.from_params(params, folder, vae)
    if state:  # an init run trained with λ_adv = 0 exports an empty disc state: keep the fresh one
        disc.load_trainable_state_dict(state)
    if params["train"]["grad_checkpointing"]:
        disc.enable_gradient_checkpointing()  # the VAE decoder of the vae front end (ablation e)
    return disc.to(device).train()


def make_optimizers(nets: Nets, cfg: dict) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    opt_g = torch.optim.Adam(list(nets.trainable.values()), lr=cfg["lr"])
    opt_d = torch.optim.Adam(nets.disc.trainable_parameters(), lr=cfg["lr_disc"]) if nets.disc else None
    return opt_g, opt_d


class Data:
    """The train LatentDataset(s) and this rank's shard of global batch `step`."""

    def __init__(self, params: dict, latents_root, stage: str, env, device):
        self.params, self.root, self.stage, self.env, self.device = params, latents_root, stage, env, device
        self.cfg = params[stage]
        self.global_batch = self.cfg["batch_size"] * env.world_size
        self.datasets = {}

    def resolution(self, step: int) -> str:
        if self.stage == "lgp":
            return self.cfg["resolution"]
        current = self.cfg["resolution_schedule"][0]["resolution"]
        for entry in self.cfg["resolution_schedule"]:
            if step >= entry["from_step"]:
                current = entry["resolution"]
        return current

    def dataset(self, name: str):
        from osv.latents import LatentDataset

        if name not in self.datasets:
            size = self.params["data"]["resolution" if name == "high" else "low_resolution"]
            ds = LatentDataset(self.root, "train", size["width"], size["height"])
            if len(ds) == 0:
                raise ValueError(f"{self.root}: no train latents at {size['width']}x{size['height']}")
            self.datasets[name] = ds
        return self.datasets[name]

    def batch(self, step: int) -> tuple[dict, list[int], str]:
        """(collated batch, global sample slots of this rank, resolution name)."""
        from osv.train.distributed import shard
        from osv.train.loop import collate, data_indices

        name = self.resolution(step)
        ds = self.dataset(name)
        indices = data_indices(self.params["seed"], step, self.global_batch, len(ds))
        slots = shard(list(range(self.global_batch)), self.env)
        return collate([ds[indices[j]] for j in slots], self.device), slots, name


# ----------------------------------------------------------------------------- one iteration


def set_requires_grad(params, flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def train_step(nets: Nets, state: State, batch: dict, slots, params: dict, stage: str, sigmas, prec, env) -> dict:
    """One D step, one G step, one EMA update; returns the logged scalars (rank-local)."""
    import torch.nn.functional as F

    from osv.conditioning import from_batch
    from osv.losses import d_hinge_loss, g_loss
    from osv.numerics import injected
    from osv.train.distributed import any_flag, average_gradients
    from osv.train.loop import NonFiniteLossError, check_finite
    from osv.train.objectives import acd_targets, ema_update, lgp_targets

    cfg, clip = params[stage], params["train"]["grad_clip"]
    x0 = batch["latents"].float()
    cond = from_batch(batch, params, device=x0.device)
    targets = lgp_targets if stage == "lgp" else acd_targets
    real, fake, distance = targets(nets, x0, cond, sigmas, params, state.step, slots, prec)
    log = {"loss_d_real": 0.0, "loss_d_fake": 0.0, "loss_g_adv": 0.0, "logits_real_mean": 0.0,
           "logits_fake_mean": 0.0, "grad_norm_d": 0.0}
    d_params = nets.disc.trainable_parameters() if nets.disc else []

    def guard(losses):
        try:
            check_finite("train", losses, state.step, state.last_checkpoint)
            bad = False
        except NonFiniteLossError:
            bad = True
        if any_flag(bad, env):
            check_finite("train", losses, state.step, state.last_checkpoint)  # this rank's values, if bad here
            raise NonFiniteLossError(f"osv train: non-finite loss on another rank at step {state.step}; stopping "
                                     f"without checkpointing (last good checkpoint: {state.last_checkpoint})")

    # With a frozen front end (vae) the fake's VAE decode + DINOv2 features do not depend on D:
    # computed once, with the graph the G step backpropagates through; the D step uses them detached.
    fake_grids = None
    if nets.disc is not None and nets.disc.frozen_front_end:
        with prec.autocast():
            fake_grids = nets.disc.features_of(fake)
    if nets.disc is not None:  # discriminator step
        set_requires_grad(d_params, True)
        with prec.autocast():
            logits_real = nets.disc(real.detach())
            logits_fake = (nets.disc.logits([g.detach() for g in fake_grids], fake.shape[0])
                           if fake_grids is not None
                           else nets.disc(fake.detach()))
        loss_d = d_hinge_loss(logits_real, logits_fake)
        guard({"loss_d": loss_d})
        state.opt_d.zero_grad(set_to_none=True)
        prec.backward(loss_d)
        average_gradients(d_params, env)
        log["grad_norm_d"], _ = prec.step(state.opt_d, d_params, clip)
        real_l, fake_l = logits_real.detach(), logits_fake.detach()
        log.update(loss_d_real=float(F.relu(1 - real_l).mean()), loss_d_fake=float(F.relu(1 + fake_l).mean()),
                   logits_real_mean=float(real_l.mean()), logits_fake_mean=float(fake_l.mean()))
        set_requires_grad(d_params, False)  # the G step backpropagates through D, not into it
    loss_distance = distance.mean()
    loss_g = loss_distance * injected("train", state.step)
    if nets.disc is not None:
        with prec.autocast():
            logits = nets.disc.logits(fake_grids, fake.shape[0]) if fake_grids is not None else nets.disc(fake)
            adv = g_loss(logits, cfg["generator_loss"])
        loss_g = loss_g + cfg["lambda_adv"] * adv
        log["loss_g_adv"] = float(adv.detach())
    guard({"loss_g": loss_g})
    state.opt_g.zero_grad(set_to_none=True)
    prec.backward(loss_g)
    g_params = list(nets.trainable.values())
    average_gradients(g_params, env)
    log["grad_norm_g"], _ = prec.step(state.opt_g, g_params, clip)
    ema_update(nets, cfg["ema_decay"])
    log["loss_distance"] = float(loss_distance.detach())
    return log


# ----------------------------------------------------------------------------- checkpoints


def save(run_dir, nets: Nets, state: State, prec, curve, params: dict, run: str) -> Path:
    from osv.train.checkpoint import rng_state, save_checkpoint

    weights = {"student": {n: p.detach() for n, p in nets.trainable.items()}, "ema": nets.ema,
               "disc": nets.disc.trainable_state_dict() if nets.disc else {}}
    ckpt_state = {"step": state.step, "opt_g": state.opt_g.state_dict(),
                  "opt_d": state.opt_d.state_dict() if state.opt_d else {},
                  "scaler": prec.scaler.state_dict(), "overflow_count": prec.overflow_count,
                  "rng": rng_state(), "data_order": state.data_order}
    return save_checkpoint(run_dir, state.step, weights, ckpt_state, params["train"]["keep_last"],
                           {"curves.csv": curve.to_csv(), "params.sha256": run_fingerprint(params, run)})


def resume(run_dir, nets: Nets, state: State, prec, columns, params: dict, run: str) -> object:
    """Load the newest complete checkpoint made under these params (if any) into nets/state;
    return the curve so far."""
    from osv.student import load_trainable_state_dict
    from osv.train.checkpoint import load_latest_good, set_aside_stale, set_rng_state
    from osv.train.logging import Curve

    stale = set_aside_stale(run_dir, run_fingerprint(params, run))
    if stale is not None:
        print(f"checkpoints in {run_dir} were made under other params: moved to {stale}, starting fresh", flush=True)
    path, loaded = load_latest_good(run_dir)
    if path is None:
        return Curve(columns)
    weights, ckpt, texts = loaded
    load_trainable_state_dict(nets.student, weights["student"], strict=True)
    missing = set(nets.ema) ^ set(weights["ema"])
    if missing:
        raise KeyError(f"{path}: EMA tensors do not match the student ({sorted(missing)[:5]})")
    for n, v in weights["ema"].items():
        nets.ema[n].copy_(v)
    if nets.disc is not None:
        nets.disc.load_trainable_state_dict(weights["disc"])
    state.opt_g.load_state_dict(ckpt["opt_g"])
    if state.opt_d is not None:
        state.opt_d.load_state_dict(ckpt["opt_d"])
    if ckpt["scaler"]:  # empty when the GradScaler is disabled (fp32, bf16)
        prec.scaler.load_state_dict(ckpt["scaler"])
    prec.overflow_count = ckpt["overflow_count"]
    set_rng_state(ckpt["rng"])
    state.step, state.last_checkpoint = ckpt["step"], path
    print(f"resumed from {path} (step {state.step})", flush=True)
    return Curve.from_csv(texts.get("curves.csv", ""), columns, max_step=state.step)


# ----------------------------------------------------------------------------- the run


def train_run(params: dict, run: str, teacher: str, init: str, latents: str, ckpt: str, out: str, metrics: str,
              plots: str, dinov2: str | None = None) -> dict:
    """The work function of a training run (module-level: submitit pickles it)."""
    from osv.sde import karras_sigmas
    from osv.train.distributed import any_flag, init_distributed, mean_scalars, shutdown
    from osv.train.logging import TRAIN_COLUMNS, progress
    from osv.train.loop import Precision, StopSignal, TrainingInterrupted

    for path, what in ((teacher, "--teacher"), (init, "--init"), (latents, "--latents")):
        if not Path(path).exists():
            raise FileNotFoundError(f"osv train {run}: {what} {path} does not exist")
    env = init_distributed()
    spec = params["train"]["runs"][run]
    stage, cfg = spec["stage"], params[spec["stage"]]
    torch.manual_seed(params["seed"])  # fresh LoRA A and discriminator heads: identical on every rank
    nets = build_nets(params, stage, spec, teacher, init, dinov2, env.device)
    state = State()
    state.opt_g, state.opt_d = make_optimizers(nets, cfg)
    prec = Precision(params["train"]["precision"], env.device)
    curve = resume(ckpt, nets, state, prec, TRAIN_COLUMNS, params, run)
    data = Data(params, latents, stage, env, env.device)
    sde = params["sde"]
    sigmas = karras_sigmas(sde["num_sigmas"], sde["sigma_min"], sde["sigma_max"], sde["rho"]).float().to(env.device)
    stop = StopSignal().install()
    signal_at = int(os.environ.get(SIGNAL_AT_ENV, "-1") or -1)
    t0, start = time.time(), state.step
    bar = progress(cfg["steps"], state.step, desc=f"{run} ({stage})", enabled=env.is_main)
    try:
        while state.step < cfg["steps"]:
            if state.step == signal_at and state.step > start:
                os.kill(os.getpid(), signal.SIGTERM)
            if any_flag(stop.received is not None, env):
                if env.is_main:
                    state.last_checkpoint = save(ckpt, nets, state, prec, curve, params, run)
                print(f"{run}: signal received, checkpoint at step {state.step} ({state.last_checkpoint}); "
                      "stopping", flush=True)
                stop.chain()  # submitit's USR2 handler requeues and exits here
                raise TrainingInterrupted(f"{run}: stopped by a signal at step {state.step}; rerun to resume "
                                          f"from {state.last_checkpoint}")
            batch, slots, res_name = data.batch(state.step)
            state.data_order = {"global_batch": data.global_batch, "next_position": (state.step + 1) * data.global_batch,
                                "resolution": res_name, "seed": params["seed"]}
            log = mean_scalars(train_step(nets, state, batch, slots, params, stage, sigmas, prec, env), env)
            state.step += 1
            curve.append({"step": state.step, **log, "lr": cfg["lr"], "overflow_count": prec.overflow_count})
            bar.set_postfix(dist=f"{log['loss_distance']:.4f}", d=f"{log['loss_d_real'] + log['loss_d_fake']:.3f}")
            bar.update(1)
            if state.step % params["train"]["checkpoint_every"] == 0 and state.step < cfg["steps"] and env.is_main:
                state.last_checkpoint = save(ckpt, nets, state, prec, curve, params, run)
        bar.close()
        seconds = time.time() - t0
        result = finish(params, run, spec, nets, state, prec, curve, ckpt, out, metrics, plots, env,
                        seconds, state.step - start, teacher)
    finally:
        bar.close()  # an error message then starts on its own line
        stop.restore()
        shutdown(env)
    return result


def finish(params, run, spec, nets, state, prec, curve, ckpt, out, metrics, plots, env, seconds, steps_here,
           teacher) -> dict:
    """Final checkpoint, export, curves and metrics (rank 0)."""
    from osv.numerics import require_finite_module
    from osv.provenance import record, require_finite_metrics, write_metrics
    from osv.train.checkpoint import latest_checkpoint
    from osv.train.export import export_run

    if not env.is_main:
        return {}
    # No rows (train steps 0): no numbers rather than NaNs, which write_metrics refuses.
    final = {k: curve.last(k, window=10) for k in curve.columns if k not in ("step", "lr") and curve.rows}
    result = {"run": run, "final": final, "overflow_count": prec.overflow_count,
              "seconds": round(seconds, 1), "sec_per_step": round(seconds / max(steps_here, 1), 3),
              "protocol": protocol(params, run, spec, env, teacher, prec)}
    require_finite_module("train", nets.student, f"the student of {run}")
    require_finite_metrics("train", result, metrics)
    latest = latest_checkpoint(ckpt)
    if latest is None or not latest.name.endswith(f"{state.step:07d}"):
        state.last_checkpoint = save(ckpt, nets, state, prec, curve, params, run)
    info = {"run": run, "stage": spec["stage"], "init": spec["init"], "step": state.step,
            "params_sha256": run_fingerprint(params, run)}
    nets.teacher_fn = None  # the frozen teacher is done: the export should not hold it too (6 GB at SVD size)
    gc.collect()
    export_run(out, nets.student, nets.ema, nets.disc.trainable_state_dict() if nets.disc else None, params, info,
               teacher=teacher)
    curve.write(plots)
    write_metrics(metrics, result, record(params, "train", run, precision=prec.name, device=env.device.type))
    print(f"{run}: {state.step} steps, distance {final.get('loss_distance', math.nan):.4g}, exported to {out} "
          f"({result['sec_per_step']} s/step)", flush=True)
    return result


def run_fingerprint(params: dict, run: str) -> str:
    """Fingerprint of exactly the params this run reads: resources, eval or launcher settings
    never set its checkpoints aside."""
    from osv.dependencies import fingerprint

    return fingerprint(params, "train", run)


def protocol(params, run, spec, env, teacher, prec) -> dict:
    stage = spec["stage"]
    cfg = params[stage]
    from osv.provenance import weights_description

    weights = weights_description(params)
    return {"run": run, "stage": stage, "init": spec["init"], "steps": cfg["steps"],
            "batch_size_per_process": cfg["batch_size"], "world_size": env.world_size,
            "global_batch": cfg["batch_size"] * env.world_size, "device": str(env.device),
            "precision": prec.name, "weights": weights, "teacher": str(teacher),
            "m": cfg.get("m"), "lambda_adv": cfg["lambda_adv"], "disc_front_end": params["disc"]["front_end"]}


# ----------------------------------------------------------------------------- CLI


def command(args: argparse.Namespace) -> int:
    import sys

    from osv.launch import run_stage
    from osv.params import load_params
    from osv.train.loop import NonFiniteLossError, TrainingInterrupted

    params = load_params(args.params, run=args.run)
    # the DAG's paths, from the run (the flags override them)
    run, spec = args.run, params["train"]["runs"][args.run]
    args.init = args.init or f"models/{spec['init']}"
    args.ckpt, args.out = args.ckpt or f"runs/{run}", args.out or f"models/{run}"
    args.metrics, args.plots = args.metrics or f"metrics/train/{run}.json", args.plots or f"plots/train/{run}.csv"
    kwargs = dict(params=params, run=args.run, teacher=args.teacher, init=args.init, latents=args.latents,
                  ckpt=args.ckpt, out=args.out, metrics=args.metrics, plots=args.plots, dinov2=args.dinov2)
    try:
        run_stage("train", train_run, kwargs, params, checkpointable=True)
    except NonFiniteLossError as exc:
        print(f"{exc} [run {args.run}]", file=sys.stderr)
        return exc.exit_code
    except TrainingInterrupted as exc:
        print(f"osv train {args.run}: {exc}", file=sys.stderr)
        return 143
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="One training run (stage 1 LGP or stage 2 ACD) of train.runs.")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--run", required=True, help="a name of train.runs")
    p.add_argument("--teacher", default="models/teacher", help="teacher pipeline folder (osv teacher)")
    p.add_argument("--init", default=None, help="the export it starts from (default: models/<train.runs.RUN.init>)")
    p.add_argument("--latents", default="data/latents", help="latents root (osv encode)")
    p.add_argument("--ckpt", default=None, help="checkpoints, resumed automatically (default: runs/RUN)")
    p.add_argument("--out", default=None, help="the run's export (default: models/RUN)")
    p.add_argument("--metrics", default=None, help="metrics file (default: metrics/train/RUN.json)")
    p.add_argument("--plots", default=None, help="training curves CSV (default: plots/train/RUN.csv)")
    p.add_argument("--dinov2", default=None, help="DINOv2 folder (default: <teacher>/dinov2)")
    p.set_defaults(func=command)
