"""`osv report` on synthetic metric files, and the sample previews."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osv.eval.previews import make_previews
from osv.eval.report import split_by_protocol, write_report
from osv.params import load_params
from osv.provenance import provenance_path, read_metrics

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = {"fvd_backbone": "stand-in: rand3d-motion-v1, seed 0", "fid_backbone": "stand-in: rand2d-v1, seed 0",
            "clips_real": 16, "clips_generated": 16, "frames": 8, "resolution": [128, 64],
            "resize": "bilinear (antialiased) per frame to 64x64", "fps": 7, "seeds": 1234, "scale": "embedded",
            "weights": "small models built from configs (not SVD)"}


def moving_clips(n: int, t: int = 6, h: int = 32, w: int = 48) -> np.ndarray:
    """A bright square moving right over a gradient, one start offset per clip."""
    base = np.tile(np.linspace(0, 200, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
    clips = np.repeat(base[None, None], n * t, axis=0).reshape(n, t, h, w, 3).copy()
    for i in range(n):
        for k in range(t):
            x = (i * 3 + k * 4) % (w - 8)
            clips[i, k, 10:18, x:x + 8] = (255, 40 * i % 255, 0)
    return clips


def write_samples(folder: Path, n: int) -> np.ndarray:
    from osv.video import write_mp4

    clips = moving_clips(n)
    for i, clip in enumerate(clips):
        write_mp4(folder / f"clip-{i:04d}.mp4", clip, 7)
    return clips


def metric(fvd: float, nfe: int, **protocol_changes) -> dict:
    return {"fvd": fvd, "fid": fvd / 10, "nfe": nfe, "sec_per_video": 0.01 * nfe,
            "protocol": {**PROTOCOL, **protocol_changes}, "warnings": ["only 16 clips"]}


def test_previews_written_and_readable(tmp_path):
    from osv.eval.previews import LABEL_H

    clips = write_samples(tmp_path, 10)
    (tmp_path / "meta.json").write_text(json.dumps({"method": "osv_1", "clip_ids": [f"test/c-{i}" for i in range(10)]}))
    gif, png = make_previews(tmp_path)
    with Image.open(gif) as im:
        assert im.n_frames == clips.shape[1]
        # 8 clips (max) in 4 columns x 2 rows with 2-pixel gaps
        assert im.size == (4 * (48 + 2) + 2, 2 * (32 + 2) + 2)
        im.seek(3)
        assert np.asarray(im.convert("RGB")).std() > 0
    with Image.open(png) as im:  # a title strip, then per clip a label strip and its row of 3 frames
        assert im.size == (3 * (48 + 2) + 2, LABEL_H + 8 * (LABEL_H + 32 + 2 + 2))
        sheet = np.asarray(im.convert("RGB"))
    top = 2 * LABEL_H + 2  # clip 0's frames
    first, last = sheet[top:top + 32, 2:50].astype(int), sheet[top:top + 32, 2 + 2 * 50:50 + 2 * 50].astype(int)
    assert np.abs(first - last).mean() > 1  # first and last frame differ: the square moved
    labels = [sheet[LABEL_H + k * (LABEL_H + 36):][:LABEL_H] for k in range(2)]  # clip k's label
    assert all((label < 128).any() for label in labels)  # text drawn in each label strip
    assert np.abs(labels[0].astype(int) - labels[1]).sum() > 0  # the clip ids differ


def test_previews_need_clips(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        make_previews(tmp_path)


def test_split_by_protocol_reference_and_differences():
    metrics = {"teacher_25": metric(100.0, 50), "osv_1": metric(300.0, 1),
               "osv_tts": metric(150.0, 2, clips_real=32, frames=14)}
    reference, same, other = split_by_protocol(metrics)
    assert reference["clips_real"] == 16 and set(same) == {"teacher_25", "osv_1"}
    assert other == {"osv_tts": ["clips_real", "frames"]}
    # per-method checkpoint hashes do not split a table
    metrics["osv_1"]["protocol"]["student_sha256"] = "cd" * 32
    assert set(split_by_protocol(metrics)[1]) == {"teacher_25", "osv_1"}
    # a tie is broken in favour of the teacher's protocol
    tie = {"teacher_25": metric(100.0, 50, clips_real=8), "osv_1": metric(300.0, 1)}
    assert split_by_protocol(tie)[0]["clips_real"] == 8


@pytest.fixture()
def project(tmp_path):
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    metrics = {"teacher_25": metric(100.0, 50), "teacher_8": metric(140.0, 16), "teacher_1": metric(900.0, 2),
               "osv_1": metric(300.0, 1), "osv_2": metric(200.0, 2),
               "osv_tts": metric(123.45, 2, fvd_backbone="i3d_torchscript.pt sha256:" + "ef" * 32),
               "abl_a_m1_tts": metric(400.0, 2)}
    metrics["osv_1"]["dinov2_mse"] = {"vs_input": 0.0123, "vs_target": 0.0456, "frames": 128,
                                      "backbone": "DINOv2 (models/base/dinov2) pooled CLS at 56x56"}
    for name, m in metrics.items():
        path = tmp_path / "metrics" / "eval" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(m))
    (tmp_path / "metrics" / "vae.json").write_text(json.dumps({"psnr": 27.5}))
    train = tmp_path / "plots" / "train"
    train.mkdir(parents=True)
    for run in ("stage1", "stage2"):
        with (train / f"{run}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "loss_distance", "loss_d_real", "lr", "note"])
            for step in range(5):
                writer.writerow([step, 1.0 / (step + 1), 0.5, 5e-6, "x"])
    write_samples(tmp_path / "samples" / "osv_1", 3)
    make_previews(tmp_path / "samples" / "osv_1")
    return params, tmp_path


def test_report_tables_protocols_and_plots(project):
    params, root = project
    path = write_report(params, root / "metrics", root / "samples", root / "plots", root / "reports")
    text = path.read_text()
    tables, rest = text.split("## Rows under a different protocol")
    # paper numbers beside ours; rows we cannot produce say why
    assert "156.94" in tables and "1177.34" in tables and "335.36" in tables
    assert tables.count("not trained here") == 5  # 4 AnimateLCM rows + SF-V
    assert "osv_4`: not produced (metrics/eval/osv_4.json missing)" in tables
    # the row made under another protocol is kept out of the comparison and listed separately
    assert "123.45" not in tables and "`osv_tts`: different protocol" in tables
    assert "123.45" in rest and "fvd_backbone = i3d_torchscript.pt" in rest.split("## Previews")[0]
    # the protocol is printed once, with its warnings
    assert text.count("stand-in: rand3d-motion-v1, seed 0") == 1 and "only 16 clips" in text
    table3 = text.split("## Table 3")[1].split("## Rows")[0]
    assert "| ACD (stage 2) | 0.0123 | 0.0456 | 0.0022 | 4.09e-05 |" in table3
    assert "not computed for `abl_c_stage1_only`:" in table3 and "pooled CLS at 56x56" in table3
    # previews: the OSV one embedded, links relative to reports/
    assert "![osv_1 preview](../samples/osv_1/preview.gif)" in text
    assert "[contact.png](../samples/osv_1/contact.png)" in text
    assert "psnr = 27.5000" in text
    # plot data for DVC and the images
    with (root / "plots" / "fvd_vs_nfe.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["family"], r["method"]) for r in rows] == [
        ("OSV", "osv_1"), ("OSV", "osv_2"), ("teacher", "teacher_1"), ("teacher", "teacher_8"),
        ("teacher", "teacher_25")]
    for png in ("fvd_vs_nfe.png", "train_curves.png"):
        with Image.open(root / "reports" / png) as im:
            assert im.size[0] > 100
    summary = read_metrics(root / "reports" / "metrics.json")
    assert summary["methods"]["osv_1"]["fvd"] == 300.0 and summary["other_protocol"] == ["osv_tts"]
    assert json.loads(provenance_path(root / "reports" / "metrics.json").read_text())["stage"] == "report"
    assert "Runs: stage1, stage2" in text


def test_report_without_any_metrics(tmp_path):
    params = load_params(REPO / "params.yaml")
    text = write_report(params, tmp_path / "metrics", tmp_path / "samples", tmp_path / "plots",
                        tmp_path / "reports").read_text()
    assert "No metric files were found" in text and "No training curves found" in text
    assert (tmp_path / "plots" / "fvd_vs_nfe.csv").read_text().strip() == "family,method,nfe,fvd"


def test_missing_row_says_which_job_failed_and_why(project, monkeypatch):
    """After a failed job (keep-going), the report names the row's first failed job and its error."""
    params, root = project
    monkeypatch.chdir(root)
    (root / "logs" / "train").mkdir(parents=True)
    (root / "logs" / "train" / "stage2.log").write_text(
        "stage2 (acd):  40%|####      | 2/5\nosv train stage2: non-finite loss_g at step 2 (loss_g=nan)\n")
    (root / "logs" / "teacher.log").write_text("teacher: sample_stats_error 0.45 -> 0.04\n")  # not an error
    text = write_report(params, root / "metrics", root / "samples", root / "plots", root / "reports").read_text()
    assert ("`osv_4`: not produced (metrics/eval/osv_4.json missing; logs/train/stage2.log: osv train stage2: "
            "non-finite loss_g at step 2 (loss_g=nan))") in text


def test_paired_differences_read_the_interval_against_the_paper(monkeypatch):
    """Each Table 2 row minus the paper's best row of its ablation, with the paired interval; the
    verdict is the paper's sign against ours, inconclusive when the interval holds 0."""
    from osv.eval.report import paired_rows, paired_section, verdict

    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.1, 200)

    def row(shift: float, spread: float = 0.0) -> dict:
        reps = base + shift + rng.normal(0, spread, 200) if spread else base + shift
        return {"fvd": 100 + shift, "kvd": 1.0 + shift, "protocol": {"bootstrap": {"level": 0.95}},
                "replicates": {"fvd": list(reps * 100), "kvd": list(reps)}}

    same = {"osv_tts": row(0.0), "abl_a_m1_tts": row(0.3), "abl_e_vae_disc_tts": row(0.0, spread=0.2),
            "abl_h_high_only_tts": row(-0.3)}
    rows = {r["method"]: r for r in paired_rows(same)}
    assert set(rows) == {"abl_a_m1_tts", "abl_e_vae_disc_tts", "abl_h_high_only_tts"}
    a = rows["abl_a_m1_tts"]
    assert a["reference"] == "osv_tts" and a["paper"] == pytest.approx(332.25 - 171.15)
    assert a["kvd"][0] == pytest.approx(0.3) and a["kvd"][1] == pytest.approx((0.3, 0.3))
    assert verdict(a["paper"], a["kvd"][1]) == "same direction"
    assert verdict(rows["abl_e_vae_disc_tts"]["paper"], rows["abl_e_vae_disc_tts"]["kvd"][1]).startswith("inconclusive")
    # (h): the paper's best is "low then high" (full OSV); high only is worse there, better here
    assert verdict(rows["abl_h_high_only_tts"]["paper"], rows["abl_h_high_only_tts"]["kvd"][1]) == "opposite direction"
    text = paired_section(same)
    assert "| a | m = 1 vs full OSV | 161.10 |" in text and "training randomness" in text


def paired_metric(fvd: float, nfe: int, base: np.ndarray, shift: float, spread: float = 0.0, **extra) -> dict:
    """A metric file with FVD/KVD replicates base + shift (+ noise): replicates of two such files pair."""
    noise = np.random.default_rng(int(nfe * 10 + shift * 100) % 2**32).normal(0, spread, len(base)) if spread else 0
    reps = base + shift + noise
    return {**metric(fvd, nfe), "kvd": 1.0 + shift, "replicates": {"fvd": list(reps * 100), "kvd": list(reps)},
            **extra}


def write_clip_folder(folder: Path, clips: np.ndarray, meta: dict) -> None:
    from osv.video import write_mp4

    for i, clip in enumerate(clips):
        write_mp4(folder / f"clip-{i:04d}.mp4", clip, 7)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_teacher_worth_distilling_ode_match_and_absorption(tmp_path):
    """Frame-0 PSNR against the VAE's with the criterion's verdict; teacher steps compared by paired
    differences with a verdict per pair; ODE match to teacher_25 (120 dB for identical clips, the hand
    computation otherwise) in Table 1 and per method; guidance absorption per trained model."""
    from osv.eval.intervals import bootstrap_mean, bootstrap_ratio, interval
    from osv.eval.psnr import psnr
    from osv.eval.report import frame0_verdict, steps_verdict
    from osv.video import read_frames

    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    boot = params["eval"]["bootstrap"]
    base = np.random.default_rng(0).normal(1.0, 0.1, boot["resamples"])
    f0 = {"frame0_psnr": 19.0, "frame0_psnr_ci": {"low": 18.0, "high": 20.0}}
    metrics = {"teacher_25": paired_metric(100.0, 50, base, 0.5, **f0),  # worse than teacher_8
               "teacher_8": paired_metric(140.0, 16, base, 0.0),
               "teacher_2": paired_metric(150.0, 4, base, 0.3, spread=0.05),  # teacher_8 better than it
               "teacher_1": paired_metric(900.0, 2, base, 0.3, spread=0.5),
               "teacher_1_nocfg": paired_metric(800.0, 1, base, 0.2, frame0_psnr=12.5),
               "osv_1": paired_metric(300.0, 1, base, 0.1)}
    for name, m in metrics.items():
        path = tmp_path / "metrics" / "eval" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(m))
    (tmp_path / "metrics" / "vae.json").write_text(json.dumps({"psnr_test_db": 21.2}))
    n, ids = 8, [f"test/clip-{i:03d}" for i in range(8)]
    clips = moving_clips(n)
    noisy = np.clip(clips + np.random.default_rng(1).normal(0, 20, clips.shape), 0, 255).astype(np.uint8)
    samples = tmp_path / "samples"
    write_clip_folder(samples / "teacher_25", clips, {"clip_ids": ids})
    write_clip_folder(samples / "osv_1", clips, {"clip_ids": ids, "absorption": 0.4, "absorption_per_clip": {
        "numerator": [0.4 * (i + 1) for i in range(n)], "denominator": [float(i + 1) for i in range(n)]}})
    write_clip_folder(samples / "teacher_1", noisy, {"clip_ids": ids})
    write_clip_folder(samples / "teacher_2", noisy[:5], {"clip_ids": ids[:5]})
    write_clip_folder(samples / "teacher_8", noisy, {"clip_ids": ids[::-1]})

    text = write_report(params, tmp_path / "metrics", samples, tmp_path / "plots", tmp_path / "reports").read_text()
    table1 = text.split("## Table 1")[1].split("## Is the teacher")[0]
    worth = text.split("## Is the teacher worth distilling?")[1].split("## Distance")[0]
    distance = text.split("## Distance to the teacher's guided solution")[1].split("## Table 2")[0]
    # ODE match: identical clips hit the MSE floor; otherwise the mean of the per-clip PSNR, hand-computed
    per_clip = [psnr(read_frames(samples / "teacher_1" / f"clip-{i:04d}.mp4")[0],
                     read_frames(samples / "teacher_25" / f"clip-{i:04d}.mp4")[0]) for i in range(n)]
    lo, hi = interval(bootstrap_mean(per_clip, boot["resamples"], boot["seed"]))
    ode_t1 = f"{np.mean(per_clip):.2f} [{lo:.2f}, {hi:.2f}]"
    assert 15 < np.mean(per_clip) < 40
    assert "ODE match (PSNR to teacher_25, dB)" in table1
    assert "| reference | 50 | 156.94 | `teacher_25` |" in table1
    assert f"| {ode_t1} | 2 | 1177.34 | `teacher_1` |" in table1
    assert "| 120.00 [120.00, 120.00] | 1 | 335.36 | `osv_1` |" in table1
    # the unguided 1-step teacher: our row after the paper's teacher_1 row
    row = next(ln for ln in table1.splitlines() if "`teacher_1_nocfg`" in ln)
    assert row.startswith("| SVD teacher, no CFG | 1 | 1 |") and "ours only, not in the paper" in row
    assert table1.index("`teacher_1` |") < table1.index("`teacher_1_nocfg`") < table1.index("`osv_1`")
    # (a): 19.0 dB against 21.2 - 3 = 18.2 dB: met, but the interval [18, 20] holds the threshold
    assert "| `teacher_25` | 19.00 [18.00, 20.00] |" in worth and "| `teacher_1_nocfg` | 12.50 |" in worth
    assert "against 21.20 dB (threshold 18.20 dB): **met (but the interval holds the threshold 18.20 dB)**" in worth
    assert frame0_verdict(19.0, None, 21.2) == "met" and frame0_verdict(18.0, None, 21.2) == "not met"
    # (b): more steps minus fewer, per metric
    verdicts = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:6]] for ln in worth.splitlines()
                if ln.startswith("| `teacher_")}
    assert verdicts["`teacher_25` - `teacher_8`"][1] == "worsens" and verdicts["`teacher_25` - `teacher_8`"][3] == "worsens"
    assert verdicts["`teacher_8` - `teacher_2`"][3] == "improves"
    assert verdicts["`teacher_2` - `teacher_1`"][3].startswith("inconclusive")
    assert verdicts["`teacher_25` - `teacher_8`"][2] == "0.500 [0.500, 0.500]"
    assert (steps_verdict(None), steps_verdict((-2, -1)), steps_verdict((1, 2)), steps_verdict((-1, 1))) == (
        "no interval", "improves", "worsens", "inconclusive (interval holds 0)")
    # per method: ODE match or why not; absorption per trained model with its bootstrap interval
    assert f"| `teacher_1` | teacher | 1, CFG 3.0 | {ode_t1} |" in distance
    assert "| `teacher_2` | teacher | 2, CFG 3.0 | — (5 clips vs 8 of teacher_25) |" in distance
    assert "other test clips than teacher_25's" in distance and "| `teacher_25` | teacher | 25, CFG 3.0 | reference |" in distance
    num, den = [0.4 * (i + 1) for i in range(n)], [float(i + 1) for i in range(n)]
    alo, ahi = interval(bootstrap_ratio(num, den, boot["resamples"], boot["seed"]))
    assert f"| `stage2` | 0.400 [{alo:.3f}, {ahi:.3f}] | 8 | `osv_1` |" in distance
    assert "| `abl_a_m1` | — | — | not in its methods' meta.json" in distance
    summary = read_metrics(tmp_path / "reports" / "metrics.json")
    assert summary["methods"]["osv_1"]["ode_match_psnr"] == 120.0 and summary["absorption"] == {"stage2": 0.4}
    assert summary["methods"]["teacher_25"]["frame0_psnr"] == 19.0
    # the unguided teacher is not a point of the CFG teacher's FVD-vs-NFE curve
    assert "teacher_1_nocfg" not in (tmp_path / "plots" / "fvd_vs_nfe.csv").read_text()


def curve_runs() -> dict:
    nan = float("nan")
    teacher = {"step": [0, 1, 2, 3, 4], "loss": [nan, 0.9, 0.8, 0.7, nan], "heldout_loss": [1.0, nan, nan, nan, 0.6]}
    runs = {r: {"step": [1, 2, 3], "loss_distance": [0.2, 0.1, 0.05], "loss_d_real": [1.0, 0.9, 1.1],
                "lr": [5e-4] * 3} for r in ("stage1", "stage2")}
    return {"teacher": teacher, **runs}


def test_train_curves_one_colour_per_run_labels_legend_and_markers():
    """A run keeps its colour in every panel; every panel has a y label; one figure legend; a metric
    logged at a few steps (held-out) is drawn as markers; a panel without data is left out."""
    import matplotlib.pyplot as plt

    from osv.eval.report import train_curves_figure

    panels = [("distance", ("loss_distance",), "distance (latent units)"), ("nothing", ("absent",), "none"),
              ("disc", ("loss_d_real",), "hinge loss"), ("teacher", ("loss", "heldout_loss"), "MSE")]
    fig = train_curves_figure(curve_runs(), panels)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["distance", "disc", "teacher"]
    assert [ax.get_ylabel() for ax in axes] == ["distance (latent units)", "hinge loss", "MSE"]
    colours = {}
    for ax in axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label().split(" (")[0], set()).add(tuple(line.get_color()))
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == 3  # teacher, stage1, stage2: three colours
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in axes)
    entries = [t.get_text() for t in fig.legends[0].get_texts()]
    assert entries == ["teacher", "stage1", "stage2", "held-out evaluation"]
    held = next(ln for ln in axes[2].get_lines() if ln.get_label() == "teacher (heldout_loss)")
    assert held.get_linestyle() == "None" and held.get_marker() == "o" and list(held.get_xdata()) == [0, 4]
    loss = next(ln for ln in axes[2].get_lines() if ln.get_label() == "teacher (loss)")
    assert loss.get_linestyle() == "-" and list(loss.get_xdata()) == [1, 2, 3]
    plt.close(fig)
    assert train_curves_figure(curve_runs(), panels[1:2]) is None  # nothing to draw: no figure


def test_train_curves_draw_the_columns_dvc_plots_draws():
    """reports/train_curves.png and `dvc plots` show the same curves: every y column of the teacher
    and train stages' `plots:` in dvc.yaml is a panel of CURVE_PANELS (which adds only held-out markers)."""
    import yaml

    from osv.eval.report import CURVE_PANELS

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    dvc = {c for entries in (stages["teacher"]["plots"], stages["train"]["do"]["plots"])
           for entry in entries for spec in entry.values() for c in np.atleast_1d(spec["y"])}
    ours = {c for _, columns, _ in CURVE_PANELS for c in columns}
    assert dvc <= ours and ours - dvc <= {"heldout_loss"}, (dvc, ours)
