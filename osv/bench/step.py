"""`osv bench step`: one training step (stage 1 LGP, stage 2 ACD) against the floor of its network evaluations.

For each stage x disc front end x resolution, every network evaluation the step must make is
timed in isolation with the step's shapes and thread count (median of --repeats after a
warm-up): stage 2's m-step teacher solve (both CFG branches in one 2B batch), the EMA-target
f_θ⁻, the student forward+backward, the discriminator's D update (D(real), D(fake), backward)
and G update (D(fake), backward to the fake latents); stage 1 has no teacher or target (real =
x0). Their sum is the floor; the measured `train_step` (median of --steps after --warmup, the
package's own function on the package's own nets) is reported against it. Optimiser + EMA are
timed too and shown, but not counted in the floor (they are not network evaluations).

With the vae front end and a frozen front end, the D update's fake features are the G update's
(osv.train.distill reuses them), so the floor counts the discriminator's frozen part once for the
fake: D update = heads on detached features, G update = front end + DINOv2 forward, heads, and
the backward to the latents.

Weights: --workspace DIR loads DIR/models/teacher (teacher, VAE, DINOv2) and, for stage 2, the
export of the stage-1 run of train.runs with the same front end; otherwise small models are built
from osv/configs in a temporary folder. Latents are random with the data's shapes.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

STAGES = ("lgp", "acd")


def add_args(parser) -> None:
    if "--params" not in parser._option_string_actions:
        parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--workspace", default=None, help="a finished workspace (models/teacher, models/<run>)")
    parser.add_argument("--stages", default="lgp,acd", help="comma list of lgp, acd")
    parser.add_argument("--front-ends", default="latent,vae", help="comma list of latent, vae")
    parser.add_argument("--resolutions", default="high,low", help="comma list of high, low")
    parser.add_argument("--steps", type=int, default=5, help="timed train_step calls (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed train_step calls / evaluations first")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per isolated evaluation (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default resources.train)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")


def _median_seconds(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _folders(params: dict, stage: str, front_end: str, workspace, tmp: Path) -> tuple[Path, Path, str]:
    """(teacher folder, init folder, init name) for a run of `stage` with this front end."""
    from osv.params import deep_merge

    if workspace is None:
        from osv.models import build_small_vae
        from osv.train.teacher import write_pipeline_folder
        from osv.weights import build_base

        teacher = tmp / "teacher"
        if not teacher.exists():
            build_base(params, tmp / "base")
            build_small_vae(params["weights"]["config_seed"]).save_pretrained(str(tmp / "vae"))
            write_pipeline_folder(teacher, tmp / "base", tmp / "vae")
        return teacher, teacher, "teacher"
    models = Path(workspace) / "models"
    if stage == "lgp":
        return models / "teacher", models / "teacher", "teacher"
    for name, spec in params["train"]["runs"].items():  # a stage-1 run exported with this front end
        merged = deep_merge(params, spec.get("override", {}))
        if (spec["stage"] == "lgp" and merged["disc"]["front_end"] == front_end and merged["lgp"]["lambda_adv"] > 0
                and (models / name).is_dir()):
            return models / "teacher", models / name, name
    return models / "teacher", models / "teacher", "teacher"


def _batch(params: dict, resolution: str, batch_size: int, embed_dim: int, seed: int) -> dict:
    size = params["data"]["resolution" if resolution == "high" else "low_resolution"]
    h, w, t = size["height"] // 8, size["width"] // 8, params["data"]["frames"]
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(batch_size, t, 4, h, w, generator=g),
            "cond_latents": torch.randn(batch_size, 4, h, w, generator=g),
            "image_embeds": torch.randn(batch_size, 1, embed_dim, generator=g)}


def components(nets, params: dict, stage: str, batch: dict, sigmas, repeats: int, warmup: int) -> dict[str, float]:
    """Seconds of each network evaluation of one step, in isolation (same shapes, same threads)."""
    from osv.conditioning import from_batch
    from osv.losses import d_hinge_loss, g_loss
    from osv.samplers import guidance_ramp
    from osv.solver import euler_solve, teacher_step_sigmas
    from osv.train.distill import set_requires_grad

    cfg = params[stage]
    x0 = batch["latents"].float()
    cond = from_batch(batch, params)
    b = x0.shape[0]
    n = torch.full((b,), len(sigmas) // 2)
    sigma = sigmas[n]
    x = x0 + sigma.reshape(-1, 1, 1, 1, 1) * torch.randn_like(x0)
    time_of = lambda fn: _median_seconds(fn, repeats, warmup)  # noqa: E731
    out = {}
    if stage == "acd":
        m = cfg["m"]
        w = guidance_ramp(cfg["cfg"]["max"], x0.shape[1], cfg["cfg"]["min"])

        @torch.no_grad()
        def solve():
            return euler_solve(nets.teacher_fn, x, teacher_step_sigmas(sigmas, n - m, m), cond,
                               w if float(w.max()) > 1 else None)

        @torch.no_grad()
        def target():
            return nets.student_fn.consistency_fn(x, sigma, cond)

        out[f"teacher solve ({m} Euler steps, CFG)"] = time_of(solve)
        out["EMA target f_θ⁻ (no grad)"] = time_of(target)

    def student():
        fake = nets.student_fn.consistency_fn(x, sigma, cond)
        fake.backward(torch.ones_like(fake))

    out["student f_θ fwd+bwd"] = time_of(student)
    for p in nets.trainable.values():
        p.grad = None
    if nets.disc is None:
        return out
    disc, d_params = nets.disc, nets.disc.trainable_parameters()
    real, fake = x0, x0 + 0.1 * torch.randn_like(x0)
    if disc.frozen_front_end:  # the fake's frozen features come from the G update's forward (reused)
        with torch.no_grad():
            feats = disc.features_of(fake)
        d_fake = lambda: disc.logits(feats, b)  # noqa: E731
    else:
        d_fake = lambda: disc(fake)  # noqa: E731

    def d_update():
        d_hinge_loss(disc(real), d_fake()).backward()

    def g_update():
        g_loss(disc(fake.clone().requires_grad_(True)), cfg["generator_loss"]).backward()

    set_requires_grad(d_params, True)
    out["D update: D(real), D(fake) fwd+bwd"] = time_of(d_update)
    set_requires_grad(d_params, False)  # as in train_step: the G update backpropagates through D, not into it
    out["G update: D(fake) fwd+bwd to latents"] = time_of(g_update)
    for p in d_params:
        p.grad = None
    return out


def optimiser_seconds(nets, state, stage: str, params: dict, repeats: int, warmup: int) -> float:
    """Adam steps on G and D + the EMA update (not a network evaluation: shown, not in the floor)."""
    from osv.train.objectives import ema_update

    params_all = list(nets.trainable.values()) + (nets.disc.trainable_parameters() if nets.disc else [])
    saved = [p.detach().clone() for p in params_all]
    ema = {k: v.clone() for k, v in nets.ema.items()}
    opt_states = [opt.state_dict() for opt in (state.opt_g, state.opt_d) if opt]
    for p in params_all:
        p.grad = torch.zeros_like(p)

    def step():
        for opt in (state.opt_g, state.opt_d):
            if opt:
                opt.step()
        ema_update(nets, params[stage]["ema_decay"])

    seconds = _median_seconds(step, repeats, warmup)
    with torch.no_grad():  # leave the nets as they were
        for p, v in zip(params_all, saved):
            p.copy_(v)
            p.grad = None
        for k, v in ema.items():
            nets.ema[k].copy_(v)
    for opt, sd in zip([o for o in (state.opt_g, state.opt_d) if o], opt_states):
        opt.load_state_dict(sd)
    return seconds


def _train_step(nets, state, batch, params, stage, sigmas, prec, env) -> None:
    from osv.train.distill import train_step

    train_step(nets, state, batch, list(range(batch["latents"].shape[0])), params, stage, sigmas, prec, env)
    state.step += 1


def measure(params: dict, stage: str, front_end: str, resolutions: list[str], workspace, tmp: Path,
            args) -> list[dict]:
    from osv.params import deep_merge
    from osv.sde import karras_sigmas
    from osv.train.distill import State, build_nets, make_optimizers
    from osv.train.distributed import DistEnv
    from osv.train.loop import Precision

    teacher, init, init_name = _folders(params, stage, front_end, workspace, tmp)
    params = deep_merge(params, {"disc": {"front_end": front_end}})
    torch.manual_seed(params["seed"])
    nets = build_nets(params, stage, {"stage": stage, "init": init_name}, str(teacher), str(init), None,
                      torch.device("cpu"))
    state = State()
    state.opt_g, state.opt_d = make_optimizers(nets, params[stage])
    prec, env = Precision(params["train"]["precision"], torch.device("cpu")), DistEnv()
    sde = params["sde"]
    sigmas = karras_sigmas(sde["num_sigmas"], sde["sigma_min"], sde["sigma_max"], sde["rho"]).float()
    embed_dim = nets.student.config.cross_attention_dim
    bs = params[stage]["batch_size"]
    rows = []
    for res in resolutions:
        batch = _batch(params, res, bs, embed_dim, params["seed"])
        parts = components(nets, params, stage, batch, sigmas, args.repeats, args.warmup)
        optim = optimiser_seconds(nets, state, stage, params, args.repeats, args.warmup)
        measured = _median_seconds(lambda b=batch: _train_step(nets, state, b, params, stage, sigmas, prec, env),
                                   args.steps, args.warmup)
        floor = sum(parts.values())
        rows.append({"stage": stage, "front_end": front_end, "resolution": res, "batch": bs,
                     "latent_shape": list(batch["latents"].shape[1:]), "init": init_name,
                     "components_s": parts, "optimiser_ema_s": optim, "floor_s": floor,
                     "train_step_s": measured, "ratio": measured / floor})
    return rows


def format_table(rows: list[dict], threads: int) -> str:
    lines = [f"osv bench step: threads={threads}; floor = sum of the isolated network evaluations"]
    for r in rows:
        lines.append(f"\n{r['stage']} front_end={r['front_end']} resolution={r['resolution']} batch={r['batch']} "
                     f"latents={r['latent_shape']} init={r['init']}")
        for name, sec in r["components_s"].items():
            lines.append(f"  {name:<42} {sec:>8.3f} s")
        lines.append(f"  {'(optimisers + EMA, not in floor)':<42} {r['optimiser_ema_s']:>8.3f} s")
        lines.append(f"  {'floor':<42} {r['floor_s']:>8.3f} s")
        lines.append(f"  {'train_step (median)':<42} {r['train_step_s']:>8.3f} s   ratio {r['ratio']:.2f}x")
    return "\n".join(lines)


def run(args) -> int:
    from osv.atomic import write_json
    from osv.params import load_params, resources_for

    params = load_params(args.params)
    threads = args.threads or resources_for(params, "train")["cpus_per_task"]
    torch.set_num_threads(threads)
    lists = {k: [v.strip() for v in getattr(args, k).split(",") if v.strip()]
             for k in ("stages", "front_ends", "resolutions")}
    allowed = {"stages": STAGES, "front_ends": ("latent", "vae"), "resolutions": ("high", "low")}
    for k, values in lists.items():
        bad = [v for v in values if v not in allowed[k]]
        if bad or not values:
            raise ValueError(f"--{k.replace('_', '-')}: unknown {bad} (use {', '.join(allowed[k])})")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--steps and --repeats must be >= 1, --warmup >= 0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="osv-bench-step-") as tmp:
        for stage in lists["stages"]:
            for fe in lists["front_ends"]:
                rows += measure(params, stage, fe, lists["resolutions"], args.workspace, Path(tmp), args)
    result = {"threads": threads, "workspace": args.workspace, "results": rows}
    print(json.dumps(result, indent=2) if args.json else format_table(rows, threads))
    if args.out:
        write_json(args.out, result)
    return 0
