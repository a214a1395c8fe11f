"""`osv bench train`: seconds per iteration and peak memory of whole training iterations, per stage.

Stages: lgp (stage 1), acd (stage 2: m-step CFG teacher solve, EMA target, student, D and G
steps) and ablation e's VAE-decoder front end of each (lgp_vae, acd_vae). Each stage builds its
nets with the package's own osv.train.distill.build_nets (student = teacher UNet + LoRA through
osv.student.make_student, unfrozen layers in stage 2, gradient checkpointing per
train.grad_checkpointing, EMA, frozen teacher, discriminator) and runs the package's own
train_step: one untimed warm-up iteration (--warmup), then --iters timed ones (mean reported;
CUDA synchronised around each).

Weights are random (time and memory do not depend on them) and nothing is downloaded:
build_nets reads a weightless folder holding only config.json files, and osv.models'
load_unet / load_vae / load_dinov2 are swapped, for the build, for loaders that construct the
model from that config directly on the device. --shape small: osv/configs (params.yaml's
embedded scale); --shape svd: SVD img2vid's UNet (diffusers' default
UNetSpatioTemporalConditionModel config = osv.models.SVD_UNET_PUBLISHED), SVD's VAE (osv.models.SVD_VAE)
and DINOv2-small, with the paper's params (workflow/scales/paper.yaml: LoRA rank 64, m = 5,
bf16, gradient checkpointing).

Peak memory: each stage runs in a fresh `python -m osv.bench.train` process (unless
--no-isolate), so its peak is its own: torch.cuda.max_memory_allocated on a GPU (the reserved
peak is recorded too); on the CPU the process's peak RSS (getrusage ru_maxrss) above its RSS
before building any model. `state_gib` is the bytes of the tensors an iteration boundary holds
(weights, grads, EMA, optimiser states); the rest of the peak is activations, which
`osv bench plan` scales with the video size.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

# stage key -> (train stage, disc front end); lgp_vae / acd_vae are ablation e's runs
STAGES = {"lgp": ("lgp", "latent"), "acd": ("acd", "latent"), "lgp_vae": ("lgp", "vae"), "acd_vae": ("acd", "vae")}
DEFAULT_PARAMS = {"small": "params.yaml", "svd": "workflow/scales/paper.yaml"}
DTYPES = ("fp32", "bf16", "fp16")

def add_args(parser) -> None:
    if "--params" not in parser._option_string_actions:
        parser.add_argument("--params", default=None,
                            help=f"params file (default: {DEFAULT_PARAMS['small']} for small, "
                                 f"{DEFAULT_PARAMS['svd']} for svd)")
    parser.add_argument("--shape", choices=["small", "svd"], default="small",
                        help="small = osv/configs models; svd = SVD img2vid UNet/VAE + DINOv2-small shapes")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="train.precision for the run (default the params'; the CPU always runs fp32)")
    parser.add_argument("--frames", type=int, default=None, help="T (default data.frames)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default data.resolution)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default data.resolution)")
    parser.add_argument("--batch", type=int, default=None, help="videos per process (default <stage>.batch_size)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per stage (mean reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default resources.train.cpus_per_task, as a training job)")
    parser.add_argument("--no-isolate", action="store_true",
                        help="measure in this process (CPU peak RSS then accumulates across stages)")
    parser.add_argument("--json", "--out", dest="json_out", default=None, help="write the results as JSON here")


# ----------------------------------------------------------------------------- models from configs


def model_configs(shape: str, frames: int) -> dict:
    """{'unet', 'vae', 'dinov2'} constructor configs of a shape."""
    from osv.models import DINOV2_SMALL, SVD_VAE, small_config, svd_unet_config

    if shape == "svd":
        return {"unet": svd_unet_config(), "vae": dict(SVD_VAE), "dinov2": dict(DINOV2_SMALL)}
    return {"unet": {**small_config("unet"), "num_frames": frames}, "vae": small_config("vae"),
            "dinov2": small_config("dinov2")}


def write_weightless_folder(folder: Path, configs: dict) -> Path:
    """A teacher folder with unet/, vae/ and dinov2/ config.json files and no weights."""
    for name, cfg in configs.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def _config_of(folder, sub: str) -> dict:
    folder = Path(folder)
    path = folder / sub / "config.json" if (folder / sub).is_dir() else folder / "config.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


@contextlib.contextmanager
def random_weights(device):
    """osv.models' loaders build from the folder's config.json, random weights, on `device`."""
    import torch

    from osv import models

    def load_unet(folder):
        from diffusers import UNetSpatioTemporalConditionModel

        with torch.device(device):
            return UNetSpatioTemporalConditionModel(**_config_of(folder, "unet"))

    def load_vae(folder):
        from diffusers import AutoencoderKLTemporalDecoder

        with torch.device(device):
            return models.temporal_convs_as_conv2d(AutoencoderKLTemporalDecoder(**_config_of(folder, "vae")))

    def load_dinov2(folder):
        from transformers import Dinov2Config, Dinov2Model

        with torch.device(device):
            return Dinov2Model(Dinov2Config(**_config_of(folder, "dinov2")))

    saved = models.load_unet, models.load_vae, models.load_dinov2
    models.load_unet, models.load_vae, models.load_dinov2 = load_unet, load_vae, load_dinov2
    try:
        yield
    finally:
        models.load_unet, models.load_vae, models.load_dinov2 = saved


# ----------------------------------------------------------------------------- measuring


def cost_settings(params: dict, stage: str) -> dict:
    """The params (other than the video size) an iteration's cost depends on; `osv bench plan`
    compares a run's with the measured ones and names any difference."""
    cfg, st = params[stage], params["student"]
    out = {f"{stage}.lambda_adv": cfg["lambda_adv"], "student.lora_rank": st["lora_rank"],
           "student.lora_targets": list(st["lora_targets"]),
           "train.grad_checkpointing": params["train"]["grad_checkpointing"],
           "train.compile": params["train"]["compile"]}
    if stage == "acd":
        out.update({"acd.m": cfg["m"], "acd.cfg.max": cfg["cfg"]["max"], "student.unfreeze": list(st["unfreeze"])})
    if cfg["lambda_adv"] > 0:
        d = params["disc"]
        out.update({f"disc.{k}": d[k] for k in ("upsample_factor", "backbone_input", "layers", "head_channels")})
    return out


def state_bytes(nets, state) -> int:
    """Bytes of the tensors held between iterations: weights, buffers, grads, EMA, optimiser states."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()

    for module in (nets.student, nets.disc, getattr(nets.teacher_fn, "module", None)):
        if module is not None:
            for p in module.parameters():
                add(p)
                add(p.grad)
            for b in module.buffers():
                add(b)
    for t in nets.ema.values():
        add(t)
    for opt in (state.opt_g, state.opt_d):
        for s in (opt.state.values() if opt is not None else ()):
            for v in s.values():
                add(v)
    return total


def _current_rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure(cfg: dict, key: str) -> dict:
    """One stage's s/iter and peak memory (module level: runs in a spawned process)."""
    import gc
    import resource
    import tempfile

    import peft  # noqa: F401 -- the model libraries are imported before the RSS baseline
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel  # noqa: F401
    from transformers import Dinov2Model  # noqa: F401

    from osv.bench.step import _batch, _train_step
    from osv.params import deep_merge
    from osv.sde import karras_sigmas
    from osv.train.distill import State, build_nets, make_optimizers
    from osv.train.distributed import DistEnv
    from osv.train.loop import Precision

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    stage, front_end = STAGES[key]
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    params = deep_merge(cfg["params"], {
        "disc": {"front_end": front_end}, "train": {"precision": cfg["dtype"]},
        "data": {"frames": cfg["frames"], "resolution": {"width": cfg["width"], "height": cfg["height"]}},
        stage: {"batch_size": cfg["batch"] or cfg["params"][stage]["batch_size"]}})
    batch_size = params[stage]["batch_size"]
    row = {"stage": key, "train_stage": stage, "front_end": front_end, "shape": cfg["shape"],
           "device": cfg["device"], "device_name": device_name(cfg["device"]), "dtype_requested": cfg["dtype"],
           "frames": cfg["frames"], "width": cfg["width"], "height": cfg["height"], "batch": batch_size,
           "settings": cost_settings(params, stage)}
    gc.collect()  # with --no-isolate: the previous stage's nets
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = _current_rss_bytes()
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    try:
        with tempfile.TemporaryDirectory(prefix="osv-bench-train-") as tmp, random_weights(device):
            folder = write_weightless_folder(Path(tmp) / "teacher", cfg["configs"])
            torch.manual_seed(params["seed"])
            nets = build_nets(params, stage, {"stage": stage, "init": "teacher"}, str(folder), str(folder), None,
                              device)
        state = State()
        state.opt_g, state.opt_d = make_optimizers(nets, params[stage])
        prec, env = Precision(params["train"]["precision"], device), DistEnv(device=device)
        sde = params["sde"]
        sigmas = karras_sigmas(sde["num_sigmas"], sde["sigma_min"], sde["sigma_max"], sde["rho"]).float().to(device)
        batch = {k: v.to(device) for k, v in _batch(params, "high", batch_size,
                                                     nets.student.config.cross_attention_dim,
                                                     params["seed"]).items()}
        row.update(precision=prec.name, latent_shape=list(batch["latents"].shape),
                   student_params=sum(p.numel() for p in nets.student.parameters()),
                   trainable_params=sum(p.numel() for p in nets.trainable.values()),
                   disc_trainable_params=sum(p.numel() for p in nets.disc.trainable_parameters()) if nets.disc else 0,
                   teacher=nets.teacher_fn is not None)
        step = lambda: _train_step(nets, state, batch, params, stage, sigmas, prec, env)  # noqa: E731
        for _ in range(cfg["warmup"]):
            step()
        sync()
        times = []
        for _ in range(cfg["iters"]):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        row.update(sec_per_iter=statistics.fmean(times), iter_seconds=times,
                   state_gib=state_bytes(nets, state) / 2**30)
    except torch.cuda.OutOfMemoryError as exc:
        row["error"] = f"CUDA out of memory: {str(exc).splitlines()[0]}"
    if cuda:
        row.update(peak_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
                   memory="torch.cuda.max_memory_allocated (peak_reserved_gib: max_memory_reserved)")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        row.update(peak_gib=(peak - rss_start) / 2**30, process_peak_rss_gib=peak / 2**30,
                   memory="peak RSS of the process (getrusage ru_maxrss) above its RSS before building the nets")
    return row


def measure_isolated(cfg: dict, key: str) -> dict:
    """measure() in a fresh `python -m osv.bench.train` process; a crash becomes an error row."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="osv-bench-train-") as tmp:
        config, result = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config.write_text(json.dumps(cfg))
        proc = subprocess.run([sys.executable, "-m", "osv.bench.train", str(config), key, str(result)], check=False)
        if proc.returncode != 0 or not result.exists():
            return {"stage": key, "error": f"the measuring process exited with code {proc.returncode} "
                                           "(its error is printed above)"}
        return json.loads(result.read_text())


def bench_config(args) -> dict:
    import torch

    from osv.params import load_params, resources_for

    path = args.params or DEFAULT_PARAMS[args.shape]
    params = load_params(path)
    frames = args.frames or params["data"]["frames"]
    width = args.width or params["data"]["resolution"]["width"]
    height = args.height or params["data"]["resolution"]["height"]
    configs = model_configs(args.shape, frames)
    multiple = 8 * 2 ** (len(configs["unet"]["block_out_channels"]) - 1)  # latents halve once per block but the last
    if width % multiple or height % multiple:
        raise ValueError(f"--width {width} / --height {height}: both must be multiples of {multiple} "
                         f"for the {args.shape} UNet")
    if args.iters < 1 or args.warmup < 0 or frames < 1 or (args.batch is not None and args.batch < 1):
        raise ValueError("--iters, --frames and --batch must be >= 1, --warmup >= 0")
    return {"shape": args.shape, "params_file": str(path), "params": params, "configs": configs,
            "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "dtype": args.dtype or params["train"]["precision"], "frames": frames, "width": width,
            "height": height, "batch": args.batch, "iters": args.iters, "warmup": args.warmup,
            "threads": args.threads or resources_for(params, "train")["cpus_per_task"], "torch": torch.__version__}


def format_table(cfg: dict, rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    lines = [f"osv bench train: shape={cfg['shape']} params={cfg['params_file']} {cfg['width']}x{cfg['height']} "
             f"T={cfg['frames']} iters={cfg['iters']} (+{cfg['warmup']} warm-up) threads={cfg['threads']} "
             "random weights",
             f"{'stage':<8} {'shape':<6} {'device':<6} {'dtype':<5} {'latents [B,T,C,h,w]':<22} {'s/iter':>9} "
             f"{'peak GiB':>9} {'state GiB':>9} {'trainable':>12}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['stage']:<8} error: {r['error']}")
            continue
        lines.append(f"{r['stage']:<8} {r['shape']:<6} {r['device']:<6} {r['precision']:<5} "
                     f"{str(r['latent_shape']).replace(' ', ''):<22} {r['sec_per_iter']:>9.3f} {r['peak_gib']:>9.3f} "
                     f"{r['state_gib']:>9.3f} {r['trainable_params']:>12,}")
    if ok:
        lines.append(f"device: {ok[0]['device_name']}; memory: {ok[0]['memory']}")
        if any(r["precision"] != r["dtype_requested"] for r in ok):
            lines.append(f"precision: {ok[0]['dtype_requested']} was asked; the CPU always runs fp32 "
                         "(osv.train.loop.Precision)")
    return "\n".join(lines)


def run(args) -> int:
    from osv.atomic import write_json

    cfg = bench_config(args)
    keys = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [k for k in keys if k not in STAGES]
    if bad or not keys:
        raise ValueError(f"--stages: unknown {bad} (use {', '.join(STAGES)})")
    rows = []
    for key in keys:
        print(f"osv bench train: measuring {key} ...", flush=True)
        rows.append(measure(cfg, key) if args.no_isolate else measure_isolated(cfg, key))
    print(format_table(cfg, rows))
    if args.json_out:
        meta = {k: v for k, v in cfg.items() if k != "params"}
        write_json(args.json_out, {"config": meta, "results": rows})
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":  # the isolated measuring process: argv = config file, stage key, result path
    import sys

    Path(sys.argv[3]).write_text(json.dumps(measure(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])))
