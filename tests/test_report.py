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
    clips = write_samples(tmp_path, 10)
    gif, png = make_previews(tmp_path)
    with Image.open(gif) as im:
        assert im.n_frames == clips.shape[1]
        # 8 clips (max) in 4 columns x 2 rows with 2-pixel gaps
        assert im.size == (4 * (48 + 2) + 2, 2 * (32 + 2) + 2)
        im.seek(3)
        assert np.asarray(im.convert("RGB")).std() > 0
    with Image.open(png) as im:
        assert im.size == (3 * (48 + 2) + 2, 8 * (32 + 2) + 2)
        sheet = np.asarray(im.convert("RGB"))
    first, last = sheet[2:34, 2:50].astype(int), sheet[2:34, 2 + 2 * 50:50 + 2 * 50].astype(int)
    assert np.abs(first - last).mean() > 1  # first and last frame differ: the square moved


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
            writer.writerow(["step", "loss_g", "loss_d", "lr", "note"])
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
