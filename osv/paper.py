"""The paper's reported numbers (OSV, arXiv 2409.11367; method.md §7) as data.

`method` is the eval.methods key (params.yaml) that reproduces the row, or None
with `why_not` when this project does not train that model. The paper's protocol
differs from every protocol this project can run offline, so the report prints
these numbers beside ours for the ordering of methods, never as the same metric.
"""

from __future__ import annotations

PAPER_PROTOCOL = ("OpenVid-1M test set, 1,000 held-out clips, 14 frames at fps 7, 1024x576, FVD with an "
                  "I3D backbone (implementation not stated)")

NOT_TRAINED_ANIMATELCM = "AnimateLCM is a separate distilled model; not trained here"
NOT_TRAINED_SFV = "SF-V (the authors' re-implementation) is a separate model; not trained here"

# Table 1: FVD on OpenVid-1M test.
TABLE1 = [
    dict(label="SVD teacher, CFG 3.0", steps=25, nfe=50, fvd=156.94, method="teacher_25"),
    dict(label="SVD teacher, CFG 3.0", steps=8, nfe=16, fvd=229.94, method="teacher_8"),
    dict(label="SVD teacher, CFG 3.0", steps=2, nfe=4, fvd=1015.25, method="teacher_2"),
    dict(label="SVD teacher, CFG 3.0", steps=1, nfe=2, fvd=1177.34, method="teacher_1"),
    dict(label="AnimateLCM", steps=8, nfe=8, fvd=184.79, method=None, why_not=NOT_TRAINED_ANIMATELCM),
    dict(label="AnimateLCM", steps=4, nfe=4, fvd=405.80, method=None, why_not=NOT_TRAINED_ANIMATELCM),
    dict(label="AnimateLCM", steps=2, nfe=2, fvd=575.33, method=None, why_not=NOT_TRAINED_ANIMATELCM),
    dict(label="AnimateLCM", steps=1, nfe=1, fvd=997.94, method=None, why_not=NOT_TRAINED_ANIMATELCM),
    dict(label="SF-V", steps=1, nfe=1, fvd=425.68, method=None, why_not=NOT_TRAINED_SFV),
    dict(label="OSV", steps=1, nfe=1, fvd=335.36, method="osv_1"),
    dict(label="OSV + TTS", steps=1, nfe=2, fvd=171.15, method="osv_tts"),
    dict(label="OSV", steps=2, nfe=2, fvd=181.95, method="osv_2"),
    dict(label="OSV", steps=4, nfe=4, fvd=None, method="osv_4"),
    dict(label="OSV", steps=8, nfe=8, fvd=None, method="osv_8"),
]

# Table 2: ablations, 1 step + TTS unless noted; full OSV = 171.15.
TABLE2 = [
    dict(id="a", ablation="teacher sub-steps m", setting="m = 1", fvd=332.25, method="abl_a_m1_tts"),
    dict(id="a", ablation="teacher sub-steps m", setting="m = 5 (full OSV)", fvd=171.15, method="osv_tts"),
    dict(id="b", ablation="stage 1", setting="removed", fvd=221.75, method="abl_b_no_stage1_tts"),
    dict(id="c", ablation="stage 2 / TTS", setting="neither (stage 1 only, 1 step)", fvd=298.35,
         method="abl_c_stage1_only"),
    dict(id="c", ablation="stage 2 / TTS", setting="TTS only (stage 1 + TTS)", fvd=234.13,
         method="abl_c_stage1_only_tts"),
    dict(id="c", ablation="stage 2 / TTS", setting="both (full OSV)", fvd=171.15, method="osv_tts"),
    dict(id="d", ablation="adversarial loss", setting="removed (Huber + consistency only)", fvd=405.41,
         method="abl_d_no_adv_tts"),
    dict(id="e", ablation="discriminator front end", setting="VAE decoder", fvd=232.25,
         method="abl_e_vae_disc_tts"),
    dict(id="e", ablation="discriminator front end", setting="latent upsampler (full OSV)", fvd=171.15,
         method="osv_tts"),
    dict(id="f", ablation="inference CFG (no TTS)", setting="3.0", fvd=531.23, method="abl_f_cfg3p0"),
    dict(id="f", ablation="inference CFG (no TTS)", setting="1.5", fvd=426.71, method="abl_f_cfg1p5"),
    dict(id="f", ablation="inference CFG (no TTS)", setting="none", fvd=335.36, method="osv_1"),
    dict(id="g", ablation="stage-1 resolution (stage 1 only)", setting="576x320 (low)", fvd=455.35,
         method="abl_g_stage1_low"),
    dict(id="g", ablation="stage-1 resolution (stage 1 only)", setting="1024x576 (high)", fvd=388.86,
         method="abl_g_stage1_high"),
    dict(id="h", ablation="stage-2 resolution", setting="low then high (full OSV)", fvd=171.15,
         method="osv_tts"),
    dict(id="h", ablation="stage-2 resolution", setting="high only", fvd=173.14, method="abl_h_high_only_tts"),
]

# Table 3: MSE of DINOv2 features of the output against the input image repeated / the target.
TABLE3 = [
    dict(stage="LGP (stage 1)", vs_input=0.21, vs_target=0.26, method="abl_c_stage1_only"),
    dict(stage="ACD (stage 2)", vs_input=0.0022, vs_target=4.09e-5, method="osv_1"),
]


def paper_methods() -> set[str]:
    """Every eval.methods key the paper tables refer to."""
    return {row["method"] for table in (TABLE1, TABLE2, TABLE3) for row in table if row["method"]}
