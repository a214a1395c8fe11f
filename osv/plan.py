"""`osv bench plan`: GPU-hours, wall hours and peak memory of every training run, from measured iterations.

Reads one or more `osv bench train --json` files and a params file (default the paper's,
workflow/scales/paper.yaml). For each run of train.runs (its override merged): the stage key
(lgp, acd, or lgp_vae / acd_vae for disc.front_end = vae), its steps, its GPUs
(resources.train.gpus x nodes, the run's override included), and its video size per
segment: lgp.resolution, or acd.resolution_schedule's low and high parts. Then

  s/iter of a segment = measured s/iter x scale,     scale = (B·T·W·H)_run / (B·T·W·H)_measured
  peak of a segment   = state + (measured peak − state) x scale     (weights, grads, EMA and
                        optimiser states do not grow with the video; activations do)
  wall hours = Σ steps x s/iter / 3600,   GPU-hours = wall hours x GPUs.

A measurement at the run's exact size is used as is; otherwise the nearest size is scaled
and the row says "scaled from WxHxT". Linear scaling in frames x pixels is a first-order
estimate (attention grows faster). Any other difference between the measured settings and the
run's (acd.m, lambda_adv, LoRA rank, precision, ...) is named, never corrected for; data
loading, checkpoints and gradient all-reduce are not in the measured iteration. A run is
flagged when its peak exceeds the card's memory ("tight" above 90%: CUDA context and allocator
fragmentation are not in max_memory_allocated).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Total memory as nvidia-smi reports it, MiB (the smaller variant where SXM and PCIe differ).
CARDS_MIB = {"A100-40GB": 40536, "A100-80GB": 81920, "H100-80GB": 81559, "H200-141GB": 143771,
             "L40S-48GB": 46068, "RTX4090-24GB": 24564}
TIGHT = 0.9
FAR = 4.0  # a scale factor beyond 4x either way is called out as an extrapolation


def add_args(parser) -> None:
    if "--params" not in parser._option_string_actions:
        parser.add_argument("--params", default="workflow/scales/paper.yaml",
                            help="params file whose train.runs are planned (default the paper's)")
    parser.add_argument("--card", required=True, help=f"one of {', '.join(CARDS_MIB)}")
    parser.add_argument("--bench", required=True, nargs="+", help="`osv bench train --json` file(s)")
    parser.add_argument("--json", "--out", dest="json_out", default=None, help="write the plan as JSON here")


def card_gib(card: str) -> tuple[str, float]:
    """(canonical name, GiB) of a known card; ValueError listing the known ones otherwise."""
    for name, mib in CARDS_MIB.items():
        if name.lower() == card.lower():
            return name, mib / 1024
    known = ", ".join(f"{n} ({m / 1024:.1f} GiB)" for n, m in CARDS_MIB.items())
    raise ValueError(f"unknown card {card!r}; known cards: {known}")


def stage_key(stage: str, front_end: str) -> str:
    return stage if front_end == "latent" else f"{stage}_{front_end}"


def segments(params: dict, stage: str) -> list[tuple[str, int]]:
    """(resolution name, steps) of a run in order (osv.train.distill.Data.resolution's rule)."""
    cfg = params[stage]
    if stage == "lgp":
        return [(cfg["resolution"], cfg["steps"])]
    schedule = sorted(cfg["resolution_schedule"], key=lambda e: e["from_step"])
    out = []
    for i, entry in enumerate(schedule):
        start = 0 if i == 0 else min(entry["from_step"], cfg["steps"])
        end = min(schedule[i + 1]["from_step"], cfg["steps"]) if i + 1 < len(schedule) else cfg["steps"]
        if end > start:
            out.append((entry["resolution"], end - start))
    return out


def _size(r: dict) -> int:
    return r["batch"] * r["frames"] * r["width"] * r["height"]


def _pick(rows: list[dict], frames: int, width: int, height: int, batch: int) -> dict:
    """The measurement at exactly this size, else the nearest in B·T·W·H (log ratio)."""
    import math

    target = batch * frames * width * height
    for r in rows:
        if (r["frames"], r["width"], r["height"], r["batch"]) == (frames, width, height, batch):
            return r
    return min(rows, key=lambda r: abs(math.log(target / _size(r))))


def _differences(measured: dict, run: dict) -> list[str]:
    out = []
    adv = [k for k in run if k.endswith(".lambda_adv")]
    if adv and run[adv[0]] == 0 and measured.get(adv[0], 0) > 0:
        out.append("this run has no discriminator (lambda_adv 0), the measurement had one: an upper bound")
        measured = {k: v for k, v in measured.items() if not (k.startswith("disc.") or k == adv[0])}
        run = {k: v for k, v in run.items() if k != adv[0]}
    for k in sorted(set(measured) | set(run)):
        if measured.get(k) != run.get(k):
            out.append(f"{k}: measured {measured.get(k, '-')}, run {run.get(k, '-')} (not corrected for)")
    return out


def plan(params: dict, benches: list[dict], card: str) -> dict:
    from osv.bench.train import cost_settings
    from osv.params import deep_merge, resources_for

    card, memory = card_gib(card)
    measured = [r for b in benches for r in b["results"]]
    rows = []
    for name, spec in params["train"]["runs"].items():
        p = deep_merge(params, spec.get("override", {}))
        stage = spec["stage"]
        key, cfg = stage_key(stage, p["disc"]["front_end"]), p[stage]
        res = resources_for(p, "train")
        row = {"run": name, "stage": stage, "key": key, "init": spec["init"], "steps": cfg["steps"],
               "gpus": res["gpus"] * res["nodes"], "notes": []}
        rows.append(row)
        ok = [r for r in measured if r["stage"] == key and "error" not in r]
        if not ok:
            errors = [r["error"] for r in measured if r["stage"] == key]
            row["status"] = "not measured"
            row["notes"].append(f"measurement failed: {errors[0]}" if errors else
                                f"no measurement of {key}: run `osv bench train --stages {key}`")
            continue
        frames, batch, wall_s, peak, used = p["data"]["frames"], cfg["batch_size"], 0.0, 0.0, []
        row["segments"] = []
        for res_name, steps in segments(p, stage):
            size = p["data"]["resolution" if res_name == "high" else "low_resolution"]
            m = _pick(ok, frames, size["width"], size["height"], batch)
            scale = batch * frames * size["width"] * size["height"] / _size(m)
            sec = m["sec_per_iter"] * scale
            seg_peak = m["state_gib"] + max(m["peak_gib"] - m["state_gib"], 0.0) * scale
            row["segments"].append({"resolution": res_name, "steps": steps, "width": size["width"],
                                    "height": size["height"], "frames": frames, "batch": batch, "scale": scale,
                                    "sec_per_iter": sec, "peak_gib": seg_peak,
                                    "measured": f"{m['width']}x{m['height']}x{m['frames']}, batch {m['batch']}"})
            if scale != 1:
                far = "; far from the measurement: measure at this size" if not 1 / FAR <= scale <= FAR else ""
                row["notes"].append(f"{res_name} {size['width']}x{size['height']}x{frames}: scaled from "
                                    f"{m['width']}x{m['height']}x{m['frames']}"
                                    + (f" batch {m['batch']}" if m["batch"] != batch else "")
                                    + f" (x{scale:.4g}{far})")
            wall_s += steps * sec
            peak = max(peak, seg_peak)
            used.append(m)
        settings = cost_settings(p, stage)
        settings["train.precision"] = p["train"]["precision"]
        m = used[0]
        row["notes"] += _differences({**m.get("settings", {}), "train.precision": m.get("precision")}, settings)
        row.update(status="ok", wall_hours=wall_s / 3600, gpu_hours=wall_s / 3600 * row["gpus"],
                   sec_per_iter=wall_s / cfg["steps"] if cfg["steps"] else 0.0, peak_gib=peak,
                   fits="no" if peak > memory else "tight" if peak > TIGHT * memory else "yes",
                   measured_on=sorted({u["device_name"] for u in used}))
        if row["fits"] != "yes":
            row["notes"].append(f"peak {peak:.1f} GiB {'exceeds' if row['fits'] == 'no' else 'is within 10% of'} "
                                f"the {card}'s {memory:.1f} GiB")
    by_name = {r["run"]: r for r in rows}

    def finish(name: str):  # wall hours from the teacher to the end of this run along its init chain
        r = by_name[name]
        if r["status"] != "ok":
            return None
        before = 0.0 if r["init"] not in by_name else finish(r["init"])
        return None if before is None else before + r["wall_hours"]

    done = [r for r in rows if r["status"] == "ok"]
    chains = {r["run"]: finish(r["run"]) for r in done}
    chains = {k: v for k, v in chains.items() if v is not None}
    last = max(chains, key=chains.get) if chains else None
    devices = sorted({d for r in done for d in r["measured_on"]})
    return {"card": card, "card_gib": memory, "rows": rows, "measured_on": devices,
            "total_gpu_hours": sum(r["gpu_hours"] for r in done),
            "gpu_hours_by_stage": {s: sum(r["gpu_hours"] for r in done if r["stage"] == s) for s in ("lgp", "acd")},
            "not_measured": [r["run"] for r in rows if r["status"] != "ok"],
            "over_memory": [r["run"] for r in done if r["fits"] == "no"],
            "critical_path": {"run": last, "wall_hours": chains[last]} if last else None}


def format_plan(result: dict, params_file: str, bench_files: list[str]) -> str:
    lines = [f"osv bench plan: card {result['card']} ({result['card_gib']:.1f} GiB), params {params_file}, "
             f"bench {', '.join(bench_files)}",
             f"s/iter measured on {', '.join(result['measured_on']) or '-'}; not rescaled to the {result['card']}"
             + ("  [CPU measurement: CPU seconds and RSS, not a GPU's]"
                if any(d.startswith("cpu") for d in result["measured_on"]) else ""),
             f"{'run':<20} {'stage':<8} {'GPUs':>4} {'steps':>6} {'s/iter':>8} {'wall h':>8} {'GPU-h':>8} "
             f"{'peak GiB':>9} {'fits':>5}  notes"]
    notes = []
    for r in result["rows"]:
        refs = ""
        if r["notes"]:
            refs = ",".join(str(len(notes) + 1 + i) for i in range(len(r["notes"])))
            notes += [f"[{len(notes) + 1 + i}] {r['run']}: {n}" for i, n in enumerate(r["notes"])]
        if r["status"] != "ok":
            lines.append(f"{r['run']:<20} {r['key']:<8} {r['gpus']:>4} {r['steps']:>6} {'not measured':>45}  {refs}")
            continue
        lines.append(f"{r['run']:<20} {r['key']:<8} {r['gpus']:>4} {r['steps']:>6} {r['sec_per_iter']:>8.3f} "
                     f"{r['wall_hours']:>8.2f} {r['gpu_hours']:>8.2f} {r['peak_gib']:>9.1f} {r['fits']:>5}  {refs}")
    by = result["gpu_hours_by_stage"]
    lines.append(f"total {result['total_gpu_hours']:.2f} GPU-hours (stage 1 {by['lgp']:.2f}, stage 2 {by['acd']:.2f})"
                 + (f"; not measured: {', '.join(result['not_measured'])}" if result["not_measured"] else ""))
    if result["critical_path"]:
        cp = result["critical_path"]
        lines.append(f"longest init chain: {cp['wall_hours']:.2f} h wall, ending with {cp['run']} "
                     "(every run given its GPUs at once)")
    if result["over_memory"]:
        lines.append(f"OVER MEMORY on the {result['card']}: {', '.join(result['over_memory'])}")
    return "\n".join(lines + notes)


def run(args) -> int:
    from osv.atomic import write_json
    from osv.params import load_params

    try:
        card_gib(args.card)
    except ValueError as exc:
        print(f"osv bench plan: {exc}", file=sys.stderr)
        return 2
    benches = []
    for path in args.bench:
        if not Path(path).is_file():
            print(f"osv bench plan: {path}: no such bench file (write one with osv bench train --json)",
                  file=sys.stderr)
            return 2
        benches.append(json.loads(Path(path).read_text()))
    params = load_params(args.params)
    result = plan(params, benches, args.card)
    print(format_plan(result, str(args.params), list(args.bench)))
    if args.json_out:
        write_json(args.json_out, result)
    return 0
