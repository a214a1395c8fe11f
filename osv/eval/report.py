"""`osv report`: reports/results.md with our Tables 1-3 beside the paper's, plots and previews.

Protocol rule: one comparison holds numbers made under one protocol only. The
reference protocol of a report is the one most methods share (ties: the
teacher_25 row's, then name order); a method whose protocol differs in any
comparable key is moved out of the tables into a separate section that names
the differing keys. The paper's numbers are printed beside ours for the ordering
of methods only: its protocol (osv.paper.PAPER_PROTOCOL) is never ours.

Beside the paper's tables: is the teacher worth distilling (frame-0 PSNR against the VAE's,
paired FVD/KVD differences over teacher steps), and each method's distance to the teacher's
guided solution (teacher-ODE match, read here from samples/, and the guidance absorption
that `osv generate` measured for each trained model).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

from osv.logs import unstamped
from osv.params import load_params

# Keys that must agree for two FVD numbers to share a table (per-method hashes excluded).
PROTOCOL_KEYS = ("fvd_backbone", "fid_backbone", "clips_real", "clips_generated", "frames", "resolution",
                 "resize", "fps", "seeds", "scale", "weights")
FAMILIES = {"teacher": "teacher", "consistency": "OSV", "tts": "OSV + TTS"}


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="results.md, FVD-vs-NFE and training-curve plots")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--metrics", default="metrics", help="folder with eval/<method>.json, vae.json, teacher.json")
    p.add_argument("--samples", default="samples", help="folder with <method>/preview.gif, contact.png")
    p.add_argument("--plots", default="plots", help="reads plots/train/*.csv, writes plots/fvd_vs_nfe.csv")
    p.add_argument("--clips", default="data/clips", help="the real test clips, shown beside the samples")
    p.add_argument("--out", default="reports", help="results.md, plots and previews")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    path = write_report(params, args.metrics, args.samples, args.plots, args.out, args.clips)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- metrics and protocols

def load_metrics(metrics_dir: str | Path, methods: dict) -> dict[str, dict]:
    """metrics/eval/<method>.json (with its provenance's protocol and warnings) for every method of
    eval.methods that has one."""
    from osv.provenance import read_metrics

    out = {}
    for name in methods:
        path = Path(metrics_dir) / "eval" / f"{name}.json"
        if path.exists():
            data = read_metrics(path)
            for key in ("fvd", "nfe", "protocol"):
                if key not in data:
                    raise KeyError(f"{path}: missing key '{key}'")
            out[name] = data
    return out


def protocol_key(metric: dict) -> str:
    return json.dumps({k: metric["protocol"].get(k) for k in PROTOCOL_KEYS}, sort_keys=True)


def split_by_protocol(metrics: dict[str, dict]) -> tuple[dict | None, dict[str, dict], dict[str, list[str]]]:
    """(reference protocol, methods under it, {other method: differing keys})."""
    if not metrics:
        return None, {}, {}
    counts = Counter(protocol_key(m) for m in metrics.values())
    best = max(counts.values())
    tied = {k for k, c in counts.items() if c == best}
    order = (["teacher_25"] if "teacher_25" in metrics else []) + sorted(metrics)
    ref_name = next(n for n in order if protocol_key(metrics[n]) in tied)
    reference = metrics[ref_name]["protocol"]
    same, other = {}, {}
    for name, m in metrics.items():
        diff = [k for k in PROTOCOL_KEYS if m["protocol"].get(k) != reference.get(k)]
        if diff:
            other[name] = diff
        else:
            same[name] = m
    return {k: reference.get(k) for k in PROTOCOL_KEYS}, same, other


# ---------------------------------------------------------------- formatting

def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:.{digits}f}"
    return str(value)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# One-line errors of the osv commands ("osv train stage2: non-finite ..."), exceptions, launcher failures.
ERROR_LINE = re.compile(r"^osv \w+|^\S*Error\b|non-finite|job \S+ (failed|ended)")


def model_chain(model: str, runs: dict) -> list[str]:
    """The training runs a model is made by, most upstream first (teacher excluded)."""
    chain = []
    while model in runs:
        chain.insert(0, model)
        model = runs[model]["init"]
    return chain


def why_missing(method: str, methods: dict, logs: Path = Path("logs")) -> str:
    """'; <log>: <its last error line>' from the most upstream failed job a row needs (the teacher,
    the training runs its model starts from, its generation, its scoring), or '' when no log says
    why (the job has not run yet). methods[m]["chain"] lists the runs (write_report adds it)."""
    m = methods[method]
    runs = m.get("chain", [] if m["model"] == "teacher" else [m["model"]])
    paths = [logs / "teacher.log"] + [logs / "train" / f"{r}.log" for r in runs]
    parts = sorted((logs / "generate" / method).glob("part-*.log"))  # the fan-out's jobs (docs/design.md)
    for path in (*paths, *parts, logs / "generate" / f"{method}.log", logs / "fvd" / f"{method}.log"):
        try:
            lines = [unstamped(ln).strip() for ln in path.read_text(errors="replace").splitlines()]
            errors = [ln for ln in lines if ERROR_LINE.search(ln)]
        except OSError:
            continue
        if errors:
            return f"; {path}: {errors[-1][:200].replace('|', '/')}"
    return ""


def _ours(method: str | None, same: dict, other: dict, methods: dict) -> tuple[list, str]:
    """Our NFE, s/video, FVD, FID, KVD for a paper row and a note on why a cell is empty."""
    if method is None:
        return [None] * 5, ""
    if method not in methods:
        return [None] * 5, f"`{method}` is not in eval.methods"
    if method in other:
        return [None] * 5, f"`{method}`: different protocol (see below)"
    if method not in same:
        return [None] * 5, f"`{method}`: not produced (metrics/eval/{method}.json missing{why_missing(method, methods)})"
    m = same[method]
    return [m.get("nfe"), m.get("sec_per_video"), with_ci(m, "fvd"), m.get("fid"), with_ci(m, "kvd", 3)], \
        f"`{method}`"


def with_ci(m: dict, key: str, digits: int = 2) -> str | None:
    """'value [low, high]' where osv fvd recorded a bootstrap interval, else the value."""
    value, ci = m.get(key), m.get(f"{key}_ci")
    if value is None or not ci:
        return value if value is None else fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(ci['low'], digits)}, {fmt(ci['high'], digits)}]"


def table1(same: dict, other: dict, methods: dict, ode: dict | None = None) -> str:
    from osv.paper import TABLE1

    rows = []
    for r in with_our_rows(TABLE1, methods):
        ours, note = _ours(r["method"], same, other, methods)
        if r["method"] is None:
            note = r["why_not"]
        elif r.get("ours_only"):
            note += "; ours only, not in the paper"
        elif r["fvd"] is None:
            note += "; not reported in the paper"
        rows.append([r["label"], r["steps"], *ours, ode_cell(r["method"], ode or {}), r["nfe"], r["fvd"], note])
    header = ["method", "steps", "NFE", "s / video", "FVD (ours)", "FID (ours)", "KVD (ours)",
              f"ODE match (PSNR to {ODE_REFERENCE}, dB)", "NFE (paper)", "FVD (paper)", "row"]
    return md_table(header, rows)


def table2(same: dict, other: dict, methods: dict) -> str:
    from osv.paper import TABLE2

    rows = []
    for r in TABLE2:
        ours, note = _ours(r["method"], same, other, methods)
        rows.append([r["id"], r["ablation"], r["setting"], *ours, r["fvd"], note])
    header = ["id", "ablation", "setting", "NFE", "s / video", "FVD (ours)", "FID (ours)", "KVD (ours)",
              "FVD (paper)", "row"]
    return md_table(header, rows)


def paired_diff(a: dict, b: dict, key: str) -> tuple[float, tuple[float, float] | None]:
    """metric(a) - metric(b) and its interval from the two methods' replicates, paired by test clip."""
    from osv.eval.intervals import paired_difference

    reps = [m.get("replicates", {}).get(key) for m in (a, b)]
    level = (a["protocol"].get("bootstrap") or {}).get("level", 0.95)
    return a[key] - b[key], paired_difference(*reps, level) if all(reps) else None


def paired_rows(same: dict) -> list[dict]:
    """Every Table 2 row against the paper's best row of its ablation (the full OSV row for an ablation
    with one row): the paper's difference and ours,
    with the interval of ours from replicates paired by test clip (osv.eval.intervals)."""
    from osv.paper import TABLE2

    full_osv = next(r for r in TABLE2 if r["method"] == "osv_tts")
    out = []
    for ab in dict.fromkeys(r["id"] for r in TABLE2):
        group = [r for r in TABLE2 if r["id"] == ab]
        best = min(group, key=lambda r: r["fvd"]) if len(group) > 1 else full_osv  # (b), (d): one row each
        for r in group:
            a, b = same.get(r["method"]), same.get(best["method"])
            if r is best or a is None or b is None:
                continue
            versus = "full OSV" if best is full_osv else best["setting"]
            row = dict(id=ab, ablation=r["ablation"], setting=r["setting"], versus=versus,
                       method=r["method"], reference=best["method"], paper=r["fvd"] - best["fvd"])
            for key in ("fvd", "kvd"):
                row[key] = paired_diff(a, b, key)
            out.append(row)
    return out


def verdict(paper: float, ci: tuple[float, float] | None) -> str:
    """The paper's sign against our interval: reproduced, opposite, or inconclusive."""
    if ci is None:
        return "no interval"
    if ci[0] > 0 or ci[1] < 0:
        return "same direction" if (ci[0] > 0) == (paper > 0) else "opposite direction"
    return "inconclusive (interval holds 0)"


def paired_section(same: dict) -> str:
    rows = paired_rows(same)
    if not rows:
        return "No pair of Table 2 rows was scored under this protocol.\n"
    cells = []
    for r in rows:
        diff = {k: "—" if r[k][1] is None else f"{fmt(r[k][0], 3)} [{fmt(r[k][1][0], 3)}, {fmt(r[k][1][1], 3)}]"
                for k in ("fvd", "kvd")}
        cells.append([r["id"], f"{r['setting']} vs {r['versus']}", fmt(r["paper"]), diff["fvd"], diff["kvd"],
                      verdict(r["paper"], r["kvd"][1]), f"`{r['method']}` - `{r['reference']}`"])
    header = ["id", "comparison", "ΔFVD (paper)", "ΔFVD (ours)", "ΔKVD (ours)", "ours vs paper (KVD)", "rows"]
    return ("Each ablation row minus the paper's best row of the same ablation (positive: worse than it). "
            "Our differences carry percentile intervals from bootstrap replicates over test clips, paired "
            "across methods (the same resampled clips for both rows); the verdict reads the KVD interval, "
            "whose estimate has no clip-count bias. The intervals cover the choice of test clips only, not "
            "training randomness (one training seed per row): a difference that is small against the "
            "rows' own values can still change with another seed.\n\n" + md_table(header, cells) + "\n")


def table3(same: dict) -> str:
    from osv.paper import TABLE3

    rows, missing = [], []
    for r in TABLE3:
        mse = same.get(r["method"], {}).get("dinov2_mse")
        if mse is None:
            missing.append(r["method"])
        values = [(mse or {}).get("vs_input"), (mse or {}).get("vs_target"), r["vs_input"], r["vs_target"]]
        rows.append([r["stage"], *(None if v is None else f"{v:.3g}" for v in values), f"`{r['method']}`"])
    header = ["stage", "vs input (ours)", "vs target (ours)", "vs input (paper)", "vs target (paper)", "row"]
    text = md_table(header, rows)
    if missing:
        text += ("\n\nOur DINOv2-feature MSE is not computed for " + ", ".join(f"`{m}`" for m in missing)
                 + ": `osv fvd` computes it only when samples/M/meta.json lists `clip_ids` (the test clip "
                 "each sample was generated from) and models/base/dinov2 exists; these metric files carry "
                 "no `dinov2_mse`.")
    backbones = sorted({same[r["method"]]["dinov2_mse"]["backbone"] for r in TABLE3
                        if (same.get(r["method"], {}).get("dinov2_mse") or {}).get("backbone")})
    if backbones:
        text += ("\n\nOur reading [reconstructed]: MSE of the DINOv2 features of every generated frame against "
                 "the conditioning image (the test clip's first frame) and against the test clip's frame at the "
                 "same time; backbone " + "; ".join(backbones) + ". At the embedded scale this DINOv2 is a small "
                 "randomly initialised model, so the values are not comparable with the paper's.")
    return text


def protocol_section(reference: dict | None, same: dict) -> str:
    if reference is None:
        return "No metric files were found in metrics/eval; nothing to compare.\n"
    lines = [f"- **{k}**: {fmt(v)}" for k, v in reference.items()]
    warnings = sorted({w for m in same.values() for w in m.get("warnings", [])})
    text = "\n".join(lines)
    if warnings:
        text += "\n\nWarnings recorded with these numbers:\n" + "\n".join(f"- {w}" for w in warnings)
    return text + "\n"


def other_protocol_section(metrics: dict, other: dict[str, list[str]]) -> str:
    if not other:
        return "None: every method was evaluated under the protocol above.\n"
    text = ("These methods were evaluated under a different protocol, so their numbers are NOT put in the "
            "tables above and must not be compared with them.\n\n")
    rows = [[f"`{n}`", metrics[n].get("nfe"), metrics[n].get("fvd"), metrics[n].get("fid"),
             ", ".join(f"{k} = {fmt(metrics[n]['protocol'].get(k))}" for k in keys)]
            for n, keys in sorted(other.items())]
    return text + md_table(["method", "NFE", "FVD", "FID", "differs in"], rows) + "\n"


# ---------------------------------------------------------------- the teacher and the distance to it
# (issue #14, item 4): is the embedded teacher worth distilling, and how far is each method from the
# teacher's guided many-step solution? Every number with a bootstrap interval over test clips
# (osv.eval.intervals; the resamples of osv fvd's FVD/KVD intervals, so paired across methods).

ODE_REFERENCE = "teacher_25"  # the teacher's guided many-step solution
TEACHER_STEP_PAIRS = [("teacher_2", "teacher_1"), ("teacher_8", "teacher_2"), ("teacher_25", "teacher_8"),
                      ("teacher_25", "teacher_1")]  # (more steps, fewer steps)
FRAME0_TEACHERS = ("teacher_25", "teacher_8", "teacher_2", "teacher_1", "teacher_1_nocfg")
FRAME0_MARGIN_DB = 3.0  # criterion: the teacher's frame 0 within this of the VAE's reconstruction PSNR
# Rows of ours that the paper's Table 1 lacks, each placed after the paper row named by `after`.
OUR_TABLE1_ROWS = [dict(label="SVD teacher, no CFG", steps=1, nfe=None, fvd=None, method="teacher_1_nocfg",
                        after="teacher_1", ours_only=True)]


def with_our_rows(paper_rows: list[dict], methods: dict) -> list[dict]:
    """The paper's rows with OUR_TABLE1_ROWS (those in eval.methods) inserted after their anchors."""
    out = []
    for r in paper_rows:
        out.append(r)
        out += [o for o in OUR_TABLE1_ROWS if o["after"] == r["method"] and o["method"] in methods]
    return out


def ode_cell(method: str | None, ode: dict) -> str | None:
    if method == ODE_REFERENCE:
        return "reference"
    return with_ci(ode[method], "ode_match_psnr") if method in ode else None


def _samples(folder: Path) -> tuple[list[Path], dict]:
    meta = folder / "meta.json"
    return sorted(folder.glob("clip-*.mp4")), json.loads(meta.read_text()) if meta.exists() else {}


def _ci(replicates: list[float], boot: dict) -> dict:
    from osv.eval.intervals import interval

    return dict(zip(("low", "high"), interval(replicates, boot["level"])))


def _has_intervals(n: int, boot: dict) -> bool:
    from osv.eval.intervals import MIN_CLIPS_FOR_INTERVALS

    return bool(boot["resamples"]) and n >= MIN_CLIPS_FOR_INTERVALS


def _cpus() -> int:
    """CPUs this process may run on (its affinity: a SLURM allocation or taskset), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ode_match(samples_dir: Path, methods: dict, boot: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """Teacher-ODE match: per clip, the PSNR (osv.eval.psnr, all frames) of a method's clip against
    teacher_25's clip of the same index, which started from the same noise x_T = sigma_max eps and the
    same first frame (osv generate); the mean over clips and its bootstrap interval. Returns
    ({method: {ode_match_psnr, ode_match_psnr_ci, per_clip}}, {method: why it has none})."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from osv.eval.intervals import bootstrap_mean
    from osv.eval.psnr import psnr
    from osv.video import read_frames

    ref_paths, ref_meta = _samples(samples_dir / ODE_REFERENCE)
    others = [m for m in methods if m != ODE_REFERENCE]
    if not ref_paths:
        return {}, {m: f"no samples in {samples_dir / ODE_REFERENCE}" for m in others}
    paths, notes = {}, {}
    for name in others:
        clips, meta = _samples(samples_dir / name)
        ids, ref_ids = meta.get("clip_ids"), ref_meta.get("clip_ids")
        if not clips:
            notes[name] = f"no samples in {samples_dir / name}"
        elif len(clips) != len(ref_paths):
            notes[name] = f"{len(clips)} clips vs {len(ref_paths)} of {ODE_REFERENCE}"
        elif ids is not None and ref_ids is not None and list(ids) != list(ref_ids):
            notes[name] = f"its clips start from other test clips than {ODE_REFERENCE}'s (meta.json clip_ids)"
        else:
            paths[name] = clips

    def clip(i: int) -> dict[str, float | str]:  # the reference clip decoded once for all methods
        ref, row = read_frames(ref_paths[i])[0], {}
        for name, clips in paths.items():
            try:
                row[name] = psnr(read_frames(clips[i])[0], ref)
            except ValueError as exc:  # another frame count or resolution
                row[name] = f"{clips[i]}: {exc}"
        return row

    # Decoding dominates (~30 ms per 1024x576 frame); PyAV and numpy release the GIL.
    with ThreadPoolExecutor(max(1, min(8, _cpus()))) as pool:
        rows = list(pool.map(clip, range(len(ref_paths))))
    out = {}
    for name in paths:
        v = [row[name] for row in rows]
        bad = next((x for x in v if isinstance(x, str)), None)
        if bad is not None:
            notes[name] = bad
            continue
        out[name] = {"ode_match_psnr": float(np.mean(v)), "per_clip": v}
        if _has_intervals(len(v), boot):
            out[name]["ode_match_psnr_ci"] = _ci(bootstrap_mean(v, boot["resamples"], boot["seed"]), boot)
    return out, notes


def absorption_rows(samples_dir: Path, methods: dict, boot: dict) -> list[dict]:
    """Per trained model: the share of the teacher's CFG shift its consistency function reproduces at
    sigma_max (osv generate's guidance_absorption), from the first of its methods whose meta.json has it,
    with the bootstrap interval of the ratio of sums over clips."""
    from osv.eval.intervals import bootstrap_ratio

    by_model: dict[str, list[str]] = {}
    for name, spec in methods.items():
        if spec["model"] != "teacher":
            by_model.setdefault(spec["model"], []).append(name)
    rows = []
    for model, names in by_model.items():
        row = dict(model=model, methods=names, method=None, absorption=None, clips=0)
        for name in names:
            meta = _samples(samples_dir / name)[1]
            terms = meta.get("absorption_per_clip")
            if not terms:
                continue
            num, den = terms["numerator"], terms["denominator"]
            row.update(method=name, absorption=meta.get("absorption"), clips=len(num))
            if _has_intervals(len(num), boot) and all(d > 0 for d in den):
                row["absorption_ci"] = _ci(bootstrap_ratio(num, den, boot["resamples"], boot["seed"]), boot)
            break
        rows.append(row)
    return rows


def diff_cell(diff: tuple[float, tuple[float, float] | None]) -> str:
    value, ci = diff
    return fmt(value, 3) if ci is None else f"{fmt(value, 3)} [{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]"


def steps_verdict(ci: tuple[float, float] | None) -> str:
    """More steps minus fewer steps (lower is better): improves, worsens, or inconclusive."""
    if ci is None:
        return "no interval"
    if ci[1] < 0:
        return "improves"
    if ci[0] > 0:
        return "worsens"
    return "inconclusive (interval holds 0)"


def frame0_verdict(value: float, ci: dict | None, vae_psnr: float, margin: float = FRAME0_MARGIN_DB) -> str:
    """The criterion "frame-0 PSNR within `margin` dB of the VAE's reconstruction PSNR"."""
    threshold = vae_psnr - margin
    text = "met" if value >= threshold else "not met"
    if ci and ci["low"] < threshold <= ci["high"]:
        text += f" (but the interval holds the threshold {fmt(threshold)} dB)"
    return text


def teacher_worth_section(same: dict, metrics_dir: Path) -> str:
    """(a) Does the teacher reproduce the conditioning frame about as well as the VAE reconstructs
    frames? (b) Does its quality improve from 1 to 25 steps (paired FVD/KVD differences)?"""
    vae_path = metrics_dir / "vae.json"
    vae = json.loads(vae_path.read_text()).get("psnr_test_db") if vae_path.exists() else None
    rows = [[f"`{n}`", with_ci(same[n], "frame0_psnr")] for n in FRAME0_TEACHERS
            if same.get(n, {}).get("frame0_psnr") is not None]
    text = ("**(a) Does the teacher reproduce the conditioning frame?** Frame-0 PSNR: generated frame 0 "
            "against the test clip's frame 0 (the conditioning frame), uint8 RGB as written to and read back "
            "from the mp4s, mean over test clips of the per-clip PSNR with its bootstrap interval. The "
            "comparator is the VAE's reconstruction PSNR on the test clips (metrics/vae.json psnr_test_db: "
            "every frame, before any mp4 rounding; one number, no interval).\n\n")
    if rows:
        text += md_table(["method", "frame-0 PSNR (dB)"], rows) + "\n\n"
    teacher = same.get(ODE_REFERENCE, {})
    if teacher.get("frame0_psnr") is None:
        text += f"Criterion not evaluated: no frame-0 PSNR for `{ODE_REFERENCE}` (rerun `osv fvd`).\n\n"
    elif vae is None:
        text += f"Criterion not evaluated: {vae_path} has no psnr_test_db.\n\n"
    else:
        text += (f"Criterion \"`{ODE_REFERENCE}` frame-0 PSNR within {fmt(FRAME0_MARGIN_DB, 0)} dB of the VAE's "
                 f"reconstruction PSNR\": {with_ci(teacher, 'frame0_psnr')} dB against {fmt(vae)} dB "
                 f"(threshold {fmt(vae - FRAME0_MARGIN_DB)} dB): **"
                 f"{frame0_verdict(teacher['frame0_psnr'], teacher.get('frame0_psnr_ci'), vae)}**.\n\n")
    cells = []
    for more, fewer in TEACHER_STEP_PAIRS:
        a, b = same.get(more), same.get(fewer)
        if a is None or b is None:
            continue
        diffs = {k: paired_diff(a, b, k) for k in ("fvd", "kvd") if a.get(k) is not None and b.get(k) is not None}
        cells.append([f"`{more}` - `{fewer}`"] + [x for k in ("fvd", "kvd") for x in (
            (diff_cell(diffs[k]), steps_verdict(diffs[k][1])) if k in diffs else (None, None))])
    text += ("**(b) Does the teacher improve from 1 to 25 steps?** More steps minus fewer steps (negative: "
             "better with more steps), intervals from replicates paired by test clip as in \"Paired "
             "differences\" below; a verdict per metric.\n\n")
    if cells:
        text += md_table(["pair", "ΔFVD", "FVD verdict", "ΔKVD", "KVD verdict"], cells) + "\n"
    else:
        text += "No pair of teacher rows was scored under this protocol.\n"
    return text


def distance_section(same: dict, methods: dict, ode: dict, ode_notes: dict, absorption: list[dict]) -> str:
    """Every method's distance to the teacher's guided solution, and the guidance each trained model absorbed."""
    rows = []
    for name, spec in methods.items():
        if name == ODE_REFERENCE:
            cell = "reference"
        else:
            cell = ode_cell(name, ode) or f"— ({ode_notes.get(name, 'not computed')})"
        steps = f"{spec['steps']}" + (f", CFG {fmt(float(spec['cfg']), 1)}" if "cfg" in spec else "")
        rows.append([f"`{name}`", spec["sampler"], steps, cell, with_ci(same.get(name, {}), "frame0_psnr")])
    text = (f"ODE match: per test clip, the PSNR (all frames, dB) between a method's clip and `{ODE_REFERENCE}`'s "
            "clip with the same index, which `osv generate` started from the same noise x_T = σ_max·ε (the "
            "first draw of the same generator, for every sampler) and the same first frame; mean over clips, "
            "bootstrap interval over clips (paired with the FVD/KVD intervals). Higher is closer to the "
            "teacher's guided many-step solution; identical clips give "
            "120 dB (the MSE floor of osv/eval/psnr.py). Frame-0 PSNR as above.\n\n")
    text += md_table(["method", "sampler", "steps", f"ODE match (PSNR to {ODE_REFERENCE}, dB)",
                      "frame-0 PSNR (dB)"], rows) + "\n\n"
    text += ("Guidance absorption per trained model: the share of the teacher's CFG shift that the student's "
             "consistency function reproduces at the 1-step sampler's input x = σ_max·ε (the same noise): "
             "<f_θ − D_φ, D̂_φ − D_φ> / ‖D̂_φ − D_φ‖², summed over test clips, with D_φ the conditional teacher, "
             "D̂_φ the teacher guided with the training ramp (acd.cfg). 0: the student is the unguided "
             "teacher at σ_max; 1: it absorbed the guidance. Interval: bootstrap of the ratio of sums over "
             "clips.\n\n")
    missing = "not in its methods' meta.json (rerun `osv generate`)"
    cells = [[f"`{r['model']}`", with_ci(r, "absorption", 3) if r["absorption"] is not None else "—",
              r["clips"] or None, f"`{r['method']}`" if r["method"] else missing,
              ", ".join(f"`{m}`" for m in r["methods"])] for r in absorption]
    if cells:
        text += md_table(["model", "absorption", "clips", "measured in", "methods"], cells) + "\n"
    else:
        text += "No method samples a trained model.\n"
    return text


def teacher_summary(same: dict, ode: dict, absorption: list[dict]) -> dict:
    """reports/metrics.json additions: frame-0 PSNR and ODE match per method, absorption per model."""
    methods = {n: {k: v for k, v in (("frame0_psnr", m.get("frame0_psnr")),
                                     ("ode_match_psnr", ode.get(n, {}).get("ode_match_psnr"))) if v is not None}
               for n, m in same.items()}
    return {"methods": {n: v for n, v in methods.items() if v},
            "absorption": {r["model"]: r["absorption"] for r in absorption if r["absorption"] is not None}}


# ---------------------------------------------------------------- plots

def fvd_vs_nfe_rows(same: dict, methods: dict) -> list[dict]:
    """Non-ablation methods grouped by sampler family, sorted by NFE."""
    rows = []
    for name, m in same.items():
        spec = methods[name]
        if name.startswith("abl_") or ("cfg" in spec and spec["sampler"] != "teacher"):
            continue
        if spec["sampler"] == "teacher" and spec.get("cfg", 1.0) <= 1:  # the unguided teacher: not on the CFG curve
            continue
        rows.append(dict(family=FAMILIES[spec["sampler"]], method=name, nfe=m["nfe"], fvd=m["fvd"]))
    return sorted(rows, key=lambda r: (r["family"], r["nfe"], r["method"]))


def write_fvd_vs_nfe(rows: list[dict], csv_path: Path, png_path: Path, protocol: dict | None) -> None:
    from osv.atomic import atomic_path, write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["family", "method", "nfe", "fvd"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(csv_path, buf.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for family in sorted({r["family"] for r in rows}):
        pts = [r for r in rows if r["family"] == family]
        ax.plot([p["nfe"] for p in pts], [p["fvd"] for p in pts], marker="o", label=family)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE (network evaluations per video)")
    ax.set_ylabel("FVD (lower is better)")
    ax.set_title(f"FVD vs NFE ({(protocol or {}).get('fvd_backbone', 'no data')})", fontsize=8)
    if rows:
        ax.legend()
    fig.tight_layout()
    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def read_numeric_csv(path: Path) -> dict[str, list[float]]:
    """Numeric columns of a CSV (a column with any non-numeric, non-empty cell is dropped)."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, list[float]] = {}
    for name in rows[0].keys() if rows else []:
        try:
            cols[name] = [float(r[name]) if r[name] not in ("", None) else float("nan") for r in rows]
        except ValueError:
            continue
    return cols


# The panels of reports/train_curves.png: (title, CSV columns, y label). They are the columns
# `dvc plots` draws (dvc.yaml: the teacher stage's plots/teacher.csv y = loss, the train stage's
# plots/train/<run>.csv y = loss_distance), plus the teacher's held-out loss, which the teacher
# writes every teacher.eval_every steps only and is drawn as markers on the loss panel.
CURVE_PANELS = [
    ("teacher: denoising loss", ("loss", "heldout_loss"), "EDM λ(σ)-weighted MSE (σ_data = 1, unitless)"),
    ("distillation: distance to target", ("loss_distance",), "pseudo-Huber distance (latent units)"),
]


def run_colors(runs: list[str]) -> dict[str, tuple]:
    """One colour per run, the same in every panel: tab10, or tab20's dark shades before its light
    ones for more than 10 runs (tab20's neighbours are two shades of one hue)."""
    import matplotlib

    if len(runs) <= 10:
        palette = matplotlib.colormaps["tab10"].colors
    else:
        tab20 = matplotlib.colormaps["tab20"].colors
        palette = tab20[0::2] + tab20[1::2]
    return {run: palette[i % len(palette)] for i, run in enumerate(runs)}


def sparse(values: list[float]) -> bool:
    """A column logged at a few steps only (held-out evaluations): drawn as markers, since a line
    between points separated by empty cells draws nothing."""
    finite = sum(v == v for v in values)  # NaN != NaN
    return 0 < finite < len(values) / 2


def train_curves_figure(runs: dict[str, dict[str, list[float]]], panels=CURVE_PANELS):
    """The figure of write_train_curves: one panel per entry of `panels` with data (x = step),
    one colour per run across panels, one figure legend. None when no panel has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    def points(cols, column):
        x = cols.get("step", list(range(len(cols[column]))))
        return [(a, b) for a, b in zip(x, cols[column]) if b == b]

    drawn = [p for p in panels if any(points(cols, c) for cols in runs.values() for c in p[1] if c in cols)]
    if not drawn:
        return None
    colors = run_colors(list(runs))
    fig, axes = plt.subplots(1, len(drawn), figsize=(5 * len(drawn) + 2, 3.6), squeeze=False, layout="constrained")
    shown, markers = set(), False
    for ax, (title, columns, ylabel) in zip(axes.flat, drawn):
        for run, cols in runs.items():
            for column in (c for c in columns if c in cols and points(cols, c)):
                x, y = zip(*points(cols, column))
                if sparse(cols[column]):
                    ax.plot(x, y, linestyle="none", marker="o", markersize=5, color=colors[run],
                            markeredgecolor="black", label=f"{run} ({column})")
                    markers = True
                else:
                    ax.plot(x, y, linewidth=1, color=colors[run], label=f"{run} ({column})")
                shown.add(run)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[r], linewidth=2, label=r) for r in runs if r in shown]
    if markers:
        handles.append(Line2D([], [], linestyle="none", marker="o", color="gray", markeredgecolor="black",
                              label="held-out evaluation"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, title="run")
    return fig


def write_train_curves(train_dir: Path, png_path: Path) -> list[str]:
    """reports/train_curves.png from plots/teacher.csv and plots/train/*.csv: the columns `dvc plots`
    draws (teacher loss, each run's loss_distance) and the teacher's held-out loss (CURVE_PANELS);
    returns the runs, the teacher first."""
    teacher = train_dir.parent / "teacher.csv"  # the teacher stage's curve, beside plots/train
    files = ([teacher] if teacher.exists() else []) + sorted(train_dir.glob("*.csv"))
    runs = {p.stem: cols for p in files if (cols := read_numeric_csv(p))}
    fig = train_curves_figure(runs)
    if fig is None:
        return []
    import matplotlib.pyplot as plt

    from osv.atomic import atomic_path

    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return list(runs)


# ---------------------------------------------------------------- previews and other metrics

def write_comparisons(samples: Path, clips: Path | None, out: Path, methods: dict) -> dict[str, tuple | str]:
    """reports/previews/M.png and M.gif (samples beside their real test clips) per method with
    samples, or why not; {} without a folder of real clips (a partial report before `osv data`)."""
    from osv.eval.previews import compare_with_real
    from osv.video import VideoError

    if clips is None or not clips.is_dir():
        return {}
    (out / "previews").mkdir(parents=True, exist_ok=True)  # the stage's output folder, even if empty
    cache: dict = {}  # the real clips, decoded once for all methods
    compared = {}
    for name in (m for m in methods if (samples / m).is_dir()):
        try:
            compared[name] = compare_with_real(samples / name, clips, out / "previews", name, cache=cache)
        except VideoError as exc:  # a preview is not worth losing the report over
            compared[name] = str(exc)
    return compared


def previews_section(samples: Path, out: Path, methods: dict, compared: dict | None = None) -> str:
    """The featured OSV method's samples beside the real clips (else its samples alone), and links to
    every method's previews."""
    compared = compared or {}
    lines = []
    featured = next((m for m in ("osv_tts", "osv_1") if isinstance(compared.get(m), tuple)), None)
    if featured:
        png, gif = (os.path.relpath(p, out) for p in compared[featured])
        lines.append(f"OSV (`{featured}`) beside the real test clips it started from (left: generated, right: "
                     f"real; first clips):\n\n![{featured} beside real clips]({gif})\n\n"
                     f"![{featured} beside real clips, frames]({png})\n")
    elif featured := next((m for m in ("osv_tts", "osv_1") if (samples / m / "preview.gif").exists()), None):
        rel = os.path.relpath(samples / featured / "preview.gif", out)
        lines.append(f"OSV (`{featured}`), first clips:\n\n![{featured} preview]({rel})\n")
    for name in methods:
        pair = compared.get(name)
        links = [f"[beside real {p.suffix[1:]}]({os.path.relpath(p, out)})" for p in pair] \
            if isinstance(pair, tuple) else []
        gif, png = samples / name / "preview.gif", samples / name / "contact.png"
        links += [f"[{p.name}]({os.path.relpath(p, out)})" for p in (gif, png) if p.exists()]
        why = f" (no side-by-side: {pair})" if isinstance(pair, str) and links else ""
        lines.append(f"- `{name}`: " + (", ".join(links) + why if links else "no previews (samples not generated)"))
    return "\n".join(lines) + "\n"


def other_metrics_section(metrics_dir: Path) -> str:
    lines = []
    for name in ("vae", "teacher"):
        path = metrics_dir / f"{name}.json"
        if not path.exists():
            lines.append(f"- {name}: {path} not found")
            continue
        data = json.loads(path.read_text())
        flat = ", ".join(f"{k} = {fmt(v, 4)}" for k, v in sorted(data.items()) if isinstance(v, int | float))
        lines.append(f"- {name} ({path}): {flat or 'no numeric entries'}")
    return "\n".join(lines) + "\n"


def timing_section(params: dict, metrics_dir: Path, samples_dir: Path, out: Path) -> str:
    """Per stage kind: what every job recorded where it ran (osv/timing.py); the report's own row is
    this process up to writing reports/metrics.json. data, weights and encode keep theirs beside
    their output folders in the workspace that holds `metrics_dir`."""
    from osv.timing import run_table

    note = ("Wall time runs from each job's process start (its own process under submitit) to the end of "
            "its work; CPU time is user+sys, child processes included; start-up is process start to the "
            "stage's command (or job) function: interpreter, imports, argument parsing.\n\n")
    return note + run_table(params, metrics_dir.parent, metrics=metrics_dir, samples=samples_dir, reports=out)


# ---------------------------------------------------------------- the report

def claims_section(metrics_dir: Path, level: float) -> tuple[str, dict]:
    """The Claims table of `osv experiment claims` (markdown) and its verdicts (for reports/metrics.json)."""
    from osv.experiments.verdicts import arms_table, claims_table
    from osv.provenance import read_metrics

    path = metrics_dir / "claims.json"
    if not path.exists():
        return f"Not produced: {path} is missing (the claims stage did not run or failed).\n", {}
    claims = read_metrics(path)
    counts = {v: sum(c["verdict"] == v for c in claims["claims"].values())
              for v in ("reproduced", "not reproduced", "inconclusive")}
    proto = claims.get("protocol", {})
    text = (f"The paper's claims on a miniature with an exact teacher (`osv experiment claims`; docs/design.md, "
            f"\"The claims miniature\"): {proto.get('data', '')}; target: {proto.get('target', '')}; "
            f"{proto.get('distance', '')}; {proto.get('interval', '')}, seeds {proto.get('seeds', '')}. "
            f"Lower distance is better. Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".\n\n"
            + claims_table(claims, level) + "\n\n" + arms_table(claims, level)
            + "\n\n![claims curves](claims_curves.png)\n")
    return text, {cid: c["verdict"] for cid, c in claims["claims"].items()}


def write_report(params: dict, metrics_dir, samples_dir, plots_dir, out_dir, clips_dir=None) -> Path:
    from osv.atomic import write_text
    from osv.paper import PAPER_PROTOCOL
    from osv.provenance import record, write_metrics

    metrics_dir, samples_dir, plots_dir, out = map(Path, (metrics_dir, samples_dir, plots_dir, out_dir))
    methods = {name: {**m, "chain": model_chain(m["model"], params["train"]["runs"])}
               for name, m in params["eval"]["methods"].items()}
    metrics = load_metrics(metrics_dir, methods)
    reference, same, other = split_by_protocol(metrics)
    write_fvd_vs_nfe(fvd_vs_nfe_rows(same, methods), plots_dir / "fvd_vs_nfe.csv", out / "fvd_vs_nfe.png",
                     reference)
    runs = write_train_curves(plots_dir / "train", out / "train_curves.png")
    compared = write_comparisons(samples_dir, clips_dir and Path(clips_dir), out, methods)
    summary = {n: {k: m.get(k) for k in ("fvd", "fid", "kvd", "nfe", "sec_per_video") if m.get(k) is not None}
               for n, m in same.items()}
    boot = params["eval"]["bootstrap"]
    ode, ode_notes = ode_match(samples_dir, methods, boot)
    absorption = absorption_rows(samples_dir, methods, boot)
    extra = teacher_summary(same, ode, absorption)
    claims_text, claims_verdicts = claims_section(metrics_dir, params["claims"]["level"])
    for n, values in extra["methods"].items():
        summary[n].update(values)
    write_metrics(out / "metrics.json", {"protocol": reference, "methods": summary, "other_protocol": sorted(other),
                                         "absorption": extra["absorption"], "claims": claims_verdicts},
                  record(params, "report", precision="n/a (copies the fvd stage's numbers)"))
    curves = ("![training curves](train_curves.png)\n\nRuns: " + ", ".join(runs)) if runs else \
        f"No training curves found in {plots_dir / 'train'}."
    smoke = ("**A smoke test, never a result**: SVD img2vid's architecture with random weights "
             "(weights.architecture svd), a few tiny clips, a few iterations; the numbers below mean nothing.\n\n"
             if params["scale"] == "paper-smoke" else "")
    text = f"""# OSV reproduction: results

{smoke}Scale **{params['scale']}**. Every number in Tables 1-3 below was made under the protocol printed
once here; the paper's columns come from {PAPER_PROTOCOL}. The two protocols differ
(backbone, clips, frames, resolution, weights), so compare the ordering of methods, not values.

## Protocol

{protocol_section(reference, same)}
## Table 1: FVD against NFE (paper Table 1)

{table1(same, other, methods, ode)}

![FVD vs NFE](fvd_vs_nfe.png)

## Is the teacher worth distilling?

{teacher_worth_section(same, metrics_dir)}
## Distance to the teacher's guided solution

{distance_section(same, methods, ode, ode_notes, absorption)}

## Claims (Tables 1-2 and Fig. 5 in miniature, exact teacher)

{claims_text}
## Table 2: ablations (paper Table 2; 1 step + TTS unless noted)

{table2(same, other, methods)}

### Paired differences: does each ablation move the way the paper's does?

{paired_section(same)}
## Table 3: MSE of DINOv2 features (paper Table 3)

{table3(same)}

## Rows under a different protocol

{other_protocol_section(metrics, other)}
## Previews

{previews_section(samples_dir, out, methods, compared)}
## Training curves

{curves}

## Other stage metrics

{other_metrics_section(metrics_dir)}
## Timing

{timing_section(params, metrics_dir, samples_dir, out)}"""
    write_text(out / "results.md", text)
    return out / "results.md"
