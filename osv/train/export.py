"""Export of a training run, models/RUN/ (docs/design.md), written atomically:

  unet/                 the student with its LoRA merged (diffusers folder; loads with
                        UNetSpatioTemporalConditionModel.from_pretrained)
  vae/ image_encoder/ feature_extractor/ scheduler/
                        the teacher's, hard-linked (no extra disk): with model_index.json and the
                        osv_pipeline.py shim the folder is a diffusers pipeline,
                        `OSVPipeline.from_pretrained("models/RUN")` (osv/pipeline.py)
  README.md             the model card (write_model_card; `osv push` refreshes it with the metrics)
  student.safetensors   LoRA + unfrozen layers, unmerged (initialises a later stage)
  ema.safetensors       the EMA θ⁻ of those parameters
  disc.safetensors      the discriminator's trainable state (upsampler + heads; empty when λ_adv = 0)
  sampler.json          how to sample it (sigmas, recommended sampler, conditioning, size)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FILES = ("student.safetensors", "ema.safetensors", "disc.safetensors")
TEACHER_PARTS = ("vae", "image_encoder", "feature_extractor", "scheduler")
SVD_REPO = "stabilityai/stable-video-diffusion-img2vid"
SVD_LICENSE = {"license": "other", "license_name": "stable-video-diffusion-community",
               "license_link": f"https://huggingface.co/{SVD_REPO}/blob/main/LICENSE.md"}


def sampler_config(params: dict) -> dict:
    sde, cond, data = params["sde"], params["conditioning"], params["data"]
    return {
        "sigma_min": sde["sigma_min"], "sigma_max": sde["sigma_max"], "rho": sde["rho"],
        "num_sigmas": sde["num_sigmas"], "sampler": "tts", "steps": 1, "boundary": params["student"]["boundary"],
        "fps": data["fps"], "motion_bucket_id": cond["motion_bucket_id"],
        "noise_aug_strength": cond["noise_aug_strength"], "frames": data["frames"],
        "resolution": dict(data["resolution"]),
    }


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def export_run(out, student, ema: dict[str, torch.Tensor], disc_state: dict[str, torch.Tensor] | None,
               params: dict, info: dict, teacher=None) -> Path:
    """Write models/RUN/ atomically; `info` (run, stage, step, provenance) goes into sampler.json.
    `teacher` (default: models/teacher beside models/RUN) supplies the pipeline's other parts."""
    from safetensors.torch import save_file

    from osv.atomic import atomic_path
    from osv.student import merge_student, trainable_state_dict

    out = Path(out)
    teacher = Path(teacher) if teacher is not None else out.parent / "teacher"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        merge_student(student).to("cpu").save_pretrained(tmp / "unet")
        meta = {k: str(v) for k, v in info.items() if isinstance(v, str | int | float)}
        save_file(_cpu(trainable_state_dict(student)), str(tmp / "student.safetensors"), metadata=meta)
        save_file(_cpu(ema), str(tmp / "ema.safetensors"), metadata=meta)
        save_file(_cpu(disc_state or {}), str(tmp / "disc.safetensors"), metadata=meta)
        config = {**sampler_config(params), "run": info}
        (tmp / "sampler.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if (teacher / "model_index.json").exists():
            write_pipeline(tmp, teacher, config)
        else:
            print(f"[osv train] {teacher}: no teacher pipeline folder; {out} holds unet/ without the pipeline "
                  "parts (load it with OSVPipeline.from_pretrained(folder, teacher=...))", flush=True)
        write_model_card(tmp, params)
    return out


def write_pipeline(folder: Path, teacher: Path, settings: dict) -> None:
    """The teacher's other parts (hard links), the shim and model_index.json: a diffusers pipeline folder."""
    from osv.hub import link_or_copy
    from osv.pipeline import SHIM, SHIM_NAME

    for part in TEACHER_PARTS:  # hidden files are workflow state (see osv.train.teacher.write_pipeline_folder)
        shutil.copytree(teacher / part, folder / part, copy_function=link_or_copy,
                        ignore=lambda d, names: [n for n in names if n.startswith(".")])
    index = json.loads((teacher / "model_index.json").read_text())
    parts = {k: index[k] for k in (*TEACHER_PARTS, "unet")}
    (folder / f"{SHIM_NAME}.py").write_text(SHIM)
    index = {"_class_name": [SHIM_NAME, "OSVPipeline"], "_diffusers_version": index["_diffusers_version"],
             **parts, "sampler": settings}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def card_metadata(params: dict) -> dict:
    """Hub metadata: SVD's base model and licence for hub weights; none for models built from configs."""
    w = params["weights"]
    meta = {"library_name": "diffusers", "pipeline_tag": "image-to-video",
            "tags": ["osv", "image-to-video", "consistency-distillation", "stable-video-diffusion"]}
    if w["source"] == "config":  # random weights from configs: no base model, no SVD licence (pyproject has none)
        return {**meta, "license": "unknown", "tags": [*meta["tags"], "random-init", "not-svd"]}
    return {**meta, "base_model": w["teacher"]["repo_id"], **SVD_LICENSE}


def _numbers(result: dict, prefix: str = "") -> list[tuple[str, float]]:
    from osv.provenance import split

    rows = []
    for k, v in split(result)[0].items():
        rows += _numbers(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return rows


def write_model_card(folder, params: dict, metrics_paths=(), repo_id: str | None = None) -> Path:
    """folder/README.md from its sampler.json, params and the metric files given (train at export time;
    `osv push` adds metrics/eval/M.json of every method sampling this run)."""
    import yaml

    from osv import __version__
    from osv.provenance import git_state, read_metrics, weights_description

    folder = Path(folder)
    s = json.loads((folder / "sampler.json").read_text())
    info = s.get("run", {})
    run, stage = info.get("run", folder.name), info.get("stage")  # folder: an atomic temp name at export
    w, git = params["weights"], git_state()
    base = f"`{w['teacher']['repo_id']}` at the pinned revision `{w['teacher']['revision']}`" \
        if w["source"] != "config" else "randomly initialised weights built from configs (NOT SVD)"
    nfe = 2 if s["sampler"] == "tts" else s["steps"]
    training = {"stage": stage, "init": info.get("init"), "steps_done": info.get("step"),
                "run": params["train"]["runs"].get(run, {}), stage: params.get(stage), "student": params["student"]}
    lines = ["---", yaml.safe_dump(card_metadata(params), sort_keys=False).strip(), "---", "",
             f"# OSV student `{run}`", "",
             f"A one-step image-to-video student distilled (OSV, stage {stage}) from {base}.",
             f"Weights: {weights_description(params)}.", "",
             "## Load and sample", "", "```python", "from osv.pipeline import OSVPipeline  # pip install osv", "",
             f'pipe = OSVPipeline.from_pretrained("{repo_id or "models/" + run}")',
             'result = pipe(image, seed=0)  # PIL image -> result.frames uint8 [T, H, W, 3]',
             "```", "",
             f"Sampler `{s['sampler']}`, {s['steps']} step(s), NFE {nfe}; Karras grid of {s['num_sigmas']} sigmas "
             f"in [{s['sigma_min']}, {s['sigma_max']}], rho {s['rho']}; {s['frames']} frames at "
             f"{s['resolution']['width']}x{s['resolution']['height']}, fps {s['fps']}, motion bucket "
             f"{s['motion_bucket_id']}, noise augmentation {s['noise_aug_strength']}.", "",
             "## Training", "", "```json", json.dumps(training, indent=2, sort_keys=True, default=str), "```", "",
             "## Metrics", ""]
    found = [Path(p) for p in metrics_paths if Path(p).exists()]
    for path in found:
        result = read_metrics(path)
        lines += [f"`{path}`:", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.6g} |" for k, v in _numbers(result)], ""]
        if "protocol" in result:
            lines += ["Protocol: `" + json.dumps(result["protocol"], sort_keys=True, default=str) + "`", ""]
    if not found:
        lines += [f"Not evaluated yet: the training metrics are metrics/train/{run}.json, the evaluation "
                  f"metrics metrics/eval/M.json of each method M of eval.methods with model `{run}` "
                  f"(`osv push` writes them into this card).", ""]
    lines += ["## Provenance", "", f"- git commit: `{git['commit']}`" + (" (edited since)" if git["dirty"] else ""),
              f"- params fingerprint (osv.dependencies, train {run}): `{info.get('params_sha256')}`",
              f"- osv {__version__}", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def load_export(folder) -> dict[str, dict[str, torch.Tensor]]:
    """{'student', 'ema', 'disc'} state dicts of an earlier run's export (for stage-2 init)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a training-run export (missing {', '.join(missing)}); "
                                "run `osv train` for that run first, or use --init models/teacher")
    return {f.split(".")[0]: load_file(str(folder / f)) for f in FILES}
