"""The claims of `osv experiment claims`: arms, the paper's direction per claim, intervals over seeds, verdicts
and tables. Torch-free, so that `osv report` renders the Claims table without loading torch."""

from __future__ import annotations

import math
import statistics

# Arms: name -> (training run or None for the teacher, sampler, steps, inference CFG: None or "train",
# the training ramp acd.cfg, which also defines the target).
ARMS = {
    "teacher_1": (None, "teacher", 1, "train"),
    "teacher_2": (None, "teacher", 2, "train"),
    "teacher_8": (None, "teacher", 8, "train"),
    "teacher_25": (None, "teacher", 25, "train"),
    "osv_1": ("osv", "consistency", 1, None),
    "osv_tts": ("osv", "tts", 1, None),
    "osv_2": ("osv", "consistency", 2, None),
    "osv_1_cfg": ("osv", "consistency", 1, "train"),
    "stage1_only_tts": ("stage1", "tts", 1, None),
    "m1_tts": ("m1", "tts", 1, None),
    "no_adv_tts": ("no_adv", "tts", 1, None),
    "no_stage1_tts": ("no_stage1", "tts", 1, None),
}

# Claims: (id, paper's statement, better arm, worse arm, where the paper shows it).
CLAIMS = [
    ("T1-teacher-2v1", "the teacher improves from 1 to 2 steps", "teacher_2", "teacher_1", "Table 1"),
    ("T1-teacher-8v2", "the teacher improves from 2 to 8 steps", "teacher_8", "teacher_2", "Table 1"),
    ("T1-teacher-25v8", "the teacher improves from 8 to 25 steps", "teacher_25", "teacher_8", "Table 1"),
    ("T1-osv1-vs-teacher2", "OSV at 1 step beats the teacher at 2 steps", "osv_1", "teacher_2", "Table 1"),
    ("T1-tts", "TTS improves OSV's 1-step sample", "osv_tts", "osv_1", "Table 1"),
    ("T1-osv2", "OSV at 2 steps beats OSV at 1 step", "osv_2", "osv_1", "Table 1"),
    ("T1-tts-vs-teacher8", "OSV + TTS beats the teacher at 8 steps", "osv_tts", "teacher_8", "Table 1"),
    ("T2a-m", "m = 5 teacher sub-steps beat m = 1 (equal iterations)", "osv_tts", "m1_tts", "Table 2a, Fig. 5"),
    ("T2b-stage1", "stage 1 (LGP) before stage 2 helps", "osv_tts", "no_stage1_tts", "Table 2b"),
    ("T2c-stage2", "stage 2 (ACD) improves on stage 1 alone", "osv_tts", "stage1_only_tts", "Table 2c"),
    ("T2d-adv", "the adversarial loss (λ_adv 0.1 vs 0) helps", "osv_tts", "no_adv_tts", "Table 2d"),
    ("T2f-cfg", "CFG absorbed: no inference CFG beats CFG 3 on the student", "osv_1", "osv_1_cfg", "Table 2f"),
]


CURVE_RUNS = ("osv", "m1", "no_adv", "no_stage1")


def t_interval(values, level: float) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over seeds."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    """The difference is worse − better (positive when the paper's direction holds)."""
    if low > 0:
        return "reproduced"
    if high < 0:
        return "not reproduced"
    return "inconclusive"


def summarise(per_seed: list[dict], curves: list[dict], level: float) -> dict:
    """Arms and claims with their intervals (numbers for DVC; verdicts and texts go to the provenance)."""
    arms = {a: dict(zip(("mean", "low", "high"), t_interval([d[a] for d in per_seed], level))) for a in ARMS}
    claims = {}
    for cid, text, better, worse, where in CLAIMS:
        mean, low, high = t_interval([d[worse] - d[better] for d in per_seed], level)
        claims[cid] = {"claim": text, "where": where, "better": better, "worse": worse,
                       "difference": mean, "low": low, "high": high, "verdict": verdict(low, high)}
    curve_rows = []
    for run in CURVE_RUNS:
        for i, (it, _) in enumerate(curves[0][run]):
            mean, low, high = t_interval([c[run][i][1] for c in curves], level)
            curve_rows.append({"run": run, "iteration": it, "mean": mean, "low": low, "high": high})
    return {"arms": arms, "claims": claims, "curves": curve_rows,
            "per_seed": {a: [d[a] for d in per_seed] for a in ARMS}}


def claims_table(metrics: dict, level: float) -> str:
    """The report's Claims table (markdown) from the claims metrics (numbers and provenance merged)."""
    lines = [f"| claim | paper | ours: distance(worse) − distance(better), {level:.0%} interval | verdict |",
             "|---|---|---|---|"]
    for cid, *_ in CLAIMS:  # the paper's order (the metrics file sorts its keys)
        c = metrics["claims"][cid]
        lines.append(f"| {c['claim']} ({c['where']}) | {c['better']} better than {c['worse']} | "
                     f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] | {c['verdict']} |")
    return "\n".join(lines)


def arms_table(metrics: dict, level: float) -> str:
    lines = [f"| arm | energy distance to the guided teacher (mean, {level:.0%} interval over seeds) |", "|---|---|"]
    for name in ARMS:
        a = metrics["arms"][name]
        lines.append(f"| {name} | {a['mean']:.4f} [{a['low']:.4f}, {a['high']:.4f}] |")
    return "\n".join(lines)
