"""Samples beside the real test clips they started from (reports/previews/M.png, M.gif)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from test_report import moving_clips

from osv.eval.previews import GAP, LABEL_H, PAD, compare_with_real, key_frames, label_strip
from osv.video import load_clip, read_frames, write_mp4


def make_case(root, n=3):
    """data/clips/test/c-i.mp4 (real) and samples/osv_1 whose clip i started from test clip n-1-i."""
    real = moving_clips(n)
    for i, clip in enumerate(real):
        write_mp4(root / "clips" / "test" / f"c-{i}.mp4", clip, 7)
    fake = 255 - real[::-1]  # sample i: the negative of its real clip, so the halves differ
    folder = root / "samples" / "osv_1"
    for i, clip in enumerate(fake):
        write_mp4(folder / f"clip-{i:04d}.mp4", clip, 7)
    ids = [f"test/c-{n - 1 - i}" for i in range(n)]
    (folder / "meta.json").write_text(json.dumps({"method": "osv_1", "fps": 7, "clip_ids": ids}))
    return folder, ids


def test_sheet_has_the_sample_left_and_its_real_clip_right(tmp_path):
    folder, ids = make_case(tmp_path)
    png, gif = compare_with_real(folder, tmp_path / "clips", tmp_path / "previews", "osv_1", max_clips=2)
    assert (png.name, gif.name) == ("osv_1.png", "osv_1.gif")
    sheet = np.asarray(Image.open(png).convert("RGB"))
    t, h, w = 6, 32, 48
    x_real = 3 * (w + PAD) + PAD + GAP
    assert sheet.shape == (LABEL_H + 2 * (LABEL_H + h + 2 * PAD), 2 * x_real - GAP, 3)  # 2 clips (max_clips)
    for k in range(2):
        sample = read_frames(folder / f"clip-{k:04d}.mp4")[0]
        real = load_clip(tmp_path / "clips" / f"{ids[k]}.mp4", t, 7, w, h)  # as the model saw it
        top = LABEL_H + k * (LABEL_H + h + 2 * PAD) + LABEL_H + PAD
        for j, f in enumerate(key_frames(t)):
            x = PAD + j * (w + PAD)
            np.testing.assert_array_equal(sheet[top:top + h, x:x + w], sample[f])
            np.testing.assert_array_equal(sheet[top:top + h, x_real + x:x_real + x + w], real[f])
        # the clip id is written above its row: the strip differs from a blank one and from the other id's
        strip = sheet[top - PAD - LABEL_H:top - PAD]
        blank = label_strip(sheet.shape[1], {})
        assert (strip != blank).any() and (strip == label_strip(sheet.shape[1], {0: ids[k]})).all()
    header = sheet[:LABEL_H]
    assert (header[:, :x_real] != 255).any() and (header[:, x_real:] != 255).any()  # "osv_1 (...)" | "real"
    with Image.open(gif) as im:
        assert im.n_frames == t and im.size == (2 * (w + 2 * PAD) + GAP, sheet.shape[0])  # a frame per half
        im.seek(t - 1)
        frame = np.asarray(im.convert("RGB")).astype(int)
    top = LABEL_H + LABEL_H + PAD
    real_last = load_clip(tmp_path / "clips" / f"{ids[0]}.mp4", t, 7, w, h)[-1]
    # a GIF frame shows one frame per clip: the last one of the real clip right of the sample's (palette: ~equal)
    x = w + 2 * PAD + GAP + PAD
    assert np.abs(frame[top:top + h, x:x + w] - real_last).mean() < 8
    assert np.abs(frame[top:top + h, PAD:PAD + w] - real_last).mean() > 50  # left: the sample (its negative)


def test_no_sheet_without_clip_ids_or_real_clips(tmp_path):
    folder, _ = make_case(tmp_path)
    assert "not found" in compare_with_real(folder, tmp_path / "elsewhere", tmp_path / "previews")
    (folder / "meta.json").write_text(json.dumps({"method": "osv_1"}))
    assert compare_with_real(folder, tmp_path / "clips", tmp_path / "previews") == "no samples with meta.json clip_ids"
    assert not (tmp_path / "previews").exists()


def test_report_embeds_the_side_by_side_previews(tmp_path):
    from test_report import REPO

    from osv.eval.report import write_report
    from osv.params import load_params

    make_case(tmp_path)
    params = load_params(REPO / "params.yaml")
    text = write_report(params, tmp_path / "metrics", tmp_path / "samples", tmp_path / "plots", tmp_path / "reports",
                        tmp_path / "clips").read_text()
    assert (tmp_path / "reports" / "previews" / "osv_1.png").exists()
    assert "![osv_1 beside real clips](previews/osv_1.gif)" in text
    assert "- `osv_1`: [beside real png](previews/osv_1.png), [beside real gif](previews/osv_1.gif)" in text
    assert "- `osv_2`: no previews (samples not generated)" in text
