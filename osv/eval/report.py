"""`osv report`: reports/results.md with our Tables 1-3 beside the paper's, plots and previews.

Protocol rule: one comparison holds numbers made under one protocol only. The
reference protocol of a report is the one most methods share (ties: the
teacher_25 row's, then name order); a method whose protocol differs in any
comparable key is moved out of the tables into a separate section that names
the differing keys. The paper's numbers are printed beside ours for the ordering
of methods only: its protocol (osv.paper.PAPER_PROTOCOL) is never ours.
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

from osv.params import load_params

# Keys that must agree for two FVD numbers to share a table (per-method hashes excluded).
PROTOCOL_KEYS = ("fvd_backbone", "fid_backbone", "clips_real", "clips_generated", "frames", "resolution",
                 "resize", "fps", "seeds", "scale", "weights")
FAMILIES = {"teacher": "teacher", "consistency": "OSV", "tts": "OSV + TTS"}


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="results.md, FVD-vs-NFE and training-curve plots")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--metrics", default="metrics", help="folder with eval/<method>.json, vae.json, teacher.json")
    p.add_argument("--samples", default="samples", help="folder with <method>/preview.gif, contact.png")
    p.add_argument("--plots", default="plots", help="reads plots/train/*.csv, writes plots/fvd_vs_nfe.csv")
    p.add_argument("--out", default="reports")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    path = write_report(params, args.metrics, args.samples, args.plots, args.out)
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
    for path in (*paths, logs / "generate" / f"{method}.log", logs / "fvd" / f"{method}.log"):
        try:
            errors = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ERROR_LINE.search(ln)]
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


def table1(same: dict, other: dict, methods: dict) -> str:
    from osv.paper import TABLE1

    rows = []
    for r in TABLE1:
        ours, note = _ours(r["method"], same, other, methods)
        if r["method"] is None:
            note = r["why_not"]
        elif r["fvd"] is None:
            note += "; not reported in the paper"
        rows.append([r["label"], r["steps"], *ours, r["nfe"], r["fvd"], note])
    header = ["method", "steps", "NFE", "s / video", "FVD (ours)", "FID (ours)", "KVD (ours)", "NFE (paper)",
              "FVD (paper)", "row"]
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


def paired_rows(same: dict) -> list[dict]:
    """Every Table 2 row against the paper's best row of its ablation (the full OSV row for an ablation
    with one row): the paper's difference and ours,
    with the interval of ours from replicates paired by test clip (osv.eval.intervals)."""
    from osv.eval.intervals import paired_difference
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
                reps = [m.get("replicates", {}).get(key) for m in (a, b)]
                level = (a["protocol"].get("bootstrap") or {}).get("level", 0.95)
                row[key] = (a[key] - b[key], paired_difference(*reps, level) if all(reps) else None)
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


# ---------------------------------------------------------------- plots

def fvd_vs_nfe_rows(same: dict, methods: dict) -> list[dict]:
    """Non-ablation methods grouped by sampler family, sorted by NFE."""
    rows = []
    for name, m in same.items():
        spec = methods[name]
        if name.startswith("abl_") or ("cfg" in spec and spec["sampler"] != "teacher"):
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


def write_train_curves(train_dir: Path, png_path: Path) -> list[str]:
    """One panel per numeric column (x = step or row index), one line per run (plots/train/*.csv and
    plots/teacher.csv); returns the run names."""
    files = sorted(train_dir.glob("*.csv"))
    teacher = train_dir.parent / "teacher.csv"  # the teacher stage's curve, beside plots/train
    runs = {p.stem: read_numeric_csv(p) for p in ([teacher] if teacher.exists() else []) + files}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from osv.atomic import atomic_path

    columns = sorted({c for cols in runs.values() for c in cols if c != "step"})
    ncols = min(3, len(columns)) or 1
    nrows = -(-len(columns) // ncols) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        for run, cols in runs.items():
            if column in cols:
                x = cols.get("step", list(range(len(cols[column]))))
                ax.plot(x, cols[column], label=run, linewidth=1)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return sorted(runs)


# ---------------------------------------------------------------- previews and other metrics

def previews_section(samples: Path, out: Path, methods: dict) -> str:
    lines = []
    featured = next((m for m in ("osv_tts", "osv_1") if (samples / m / "preview.gif").exists()), None)
    if featured:
        rel = os.path.relpath(samples / featured / "preview.gif", out)
        lines.append(f"OSV (`{featured}`), first clips:\n\n![{featured} preview]({rel})\n")
    for name in methods:
        gif, png = samples / name / "preview.gif", samples / name / "contact.png"
        links = [f"[{p.name}]({os.path.relpath(p, out)})" for p in (gif, png) if p.exists()]
        lines.append(f"- `{name}`: " + (", ".join(links) if links else "no previews (samples not generated)"))
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

def write_report(params: dict, metrics_dir, samples_dir, plots_dir, out_dir) -> Path:
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
    summary = {n: {k: m.get(k) for k in ("fvd", "fid", "kvd", "nfe", "sec_per_video") if m.get(k) is not None}
               for n, m in same.items()}
    write_metrics(out / "metrics.json", {"protocol": reference, "methods": summary, "other_protocol": sorted(other)},
                  record(params, "report", precision="n/a (copies the fvd stage's numbers)"))
    curves = ("![training curves](train_curves.png)\n\nRuns: " + ", ".join(runs)) if runs else \
        f"No training curves found in {plots_dir / 'train'}."
    text = f"""# OSV reproduction: results

Scale **{params['scale']}**. Every number in Tables 1-3 below was made under the protocol printed
once here; the paper's columns come from {PAPER_PROTOCOL}. The two protocols differ
(backbone, clips, frames, resolution, weights), so compare the ordering of methods, not values.

## Protocol

{protocol_section(reference, same)}
## Table 1: FVD against NFE (paper Table 1)

{table1(same, other, methods)}

![FVD vs NFE](fvd_vs_nfe.png)

## Table 2: ablations (paper Table 2; 1 step + TTS unless noted)

{table2(same, other, methods)}

### Paired differences: does each ablation move the way the paper's does?

{paired_section(same)}
## Table 3: MSE of DINOv2 features (paper Table 3)

{table3(same)}

## Rows under a different protocol

{other_protocol_section(metrics, other)}
## Previews

{previews_section(samples_dir, out, methods)}
## Training curves

{curves}

## Other stage metrics

{other_metrics_section(metrics_dir)}
## Timing

{timing_section(params, metrics_dir, samples_dir, out)}"""
    write_text(out / "results.md", text)
    return out / "results.md"
