"""Mutation check: each named mutant of the objectives, solver, losses, samplers and training step is
a small source change that the targeted fast tests must catch.

The package is copied to a temporary folder; each mutant is applied there (its pattern must occur
exactly once), the mutant's tests run in a pytest subprocess that imports the copy, and the source is
restored. Without a mutation the same tests must pass, or a "killed" mutant would mean nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OBJ, LOSSES, SAMPLERS = "tests/test_objectives.py", "tests/test_losses.py", "tests/test_samplers.py"

# name: (file under osv/, [(pattern, replacement)], tests that must catch it)
MUTANTS = {
    "teacher solve without CFG": (
        "train/objectives.py", [("w if float(w.max()) > 1 else None).float()", "None).float()")],
        [f"{OBJ}::test_acd_teacher_solve_is_m_euler_steps_of_the_guided_teacher"]),
    "CFG branches swapped (cond/uncond)": (
        "sde.py", [("f_uncond, f_cond = both.chunk(2)", "f_cond, f_uncond = both.chunk(2)")],
        [f"{OBJ}::test_acd_teacher_solve_is_m_euler_steps_of_the_guided_teacher"]),
    "per-frame CFG ramp reversed": (
        "train/objectives.py", [("guidance_ramp(hi, frames, lo)", "guidance_ramp(lo, frames, hi)")],
        [f"{OBJ}::test_acd_teacher_solve_is_m_euler_steps_of_the_guided_teacher"]),
    "random CFG ramp reversed (w_end → min)": (
        "train/objectives.py", [("guidance_ramp(float(e), frames, lo)", "guidance_ramp(lo, frames, float(e))")],
        [f"{OBJ}::test_acd_random_cfg_is_a_per_sample_ramp_that_the_teacher_solve_uses"]),
    "random CFG drawn once for the whole batch": (
        "train/objectives.py", [('sample_rand(seed, step, slots, stream="cfg")',
                                 'sample_rand(seed, step, [0] * len(slots), stream="cfg")')],
        [f"{OBJ}::test_acd_random_cfg_is_a_per_sample_ramp_that_the_teacher_solve_uses"]),
    "teacher solve one sub-step short": (
        "solver.py", [("torch.arange(m, -1, -1,", "torch.arange(m - 1, -1, -1,")],
        [f"{OBJ}::test_acd_teacher_solve_is_m_euler_steps_of_the_guided_teacher"]),
    "EMA as ema·(1−d) + θ·d": (
        "train/objectives.py", [("torch._foreach_mul_(ema, decay)", "torch._foreach_mul_(ema, 1 - decay)"),
                                ("alpha=1 - decay)", "alpha=decay)")],
        [f"{OBJ}::test_ema_update_moves_the_ema_toward_the_online_weights_by_one_minus_decay"]),
    "ACD target from the online weights": (
        "train/objectives.py", [("        with ema_weights(nets):\n", "        if True:\n")],
        [f"{OBJ}::test_acd_target_is_computed_with_the_ema_weights_without_gradient"]),
    "EMA swap not undone on an exception": (
        "train/objectives.py", [("    try:\n        yield\n    finally:\n", "    yield\n    if True:\n")],
        [f"{OBJ}::test_ema_weights_swaps_the_ema_in_and_restores_the_online_weights_exactly"]),
    "ACD target computed with gradients": (
        "train/objectives.py", [("with torch.no_grad(), prec.autocast():", "with prec.autocast():")],
        [f"{OBJ}::test_acd_target_is_computed_with_the_ema_weights_without_gradient"]),
    "off-by-one σ index (σ_{n+m−1} for σ_{n+m})": (
        "train/objectives.py", [("sigmas[n], sigmas[n + m]", "sigmas[n], sigmas[n + m - 1]")],
        [f"{OBJ}::test_acd_fake_and_its_lambda_weighted_distance"]),
    "ACD student evaluated at σ_n": (
        "train/objectives.py",
        [("consistency_fn(x_nm, sigma_nm, cond)", "consistency_fn(x_nm, sigma_n, cond)")],
        [f"{OBJ}::test_acd_fake_and_its_lambda_weighted_distance"]),
    "λ(σ) over the jump σ_{n+m} − σ_n with weighting_gap next": (
        "train/objectives.py", [('sigmas[n + 1] if cfg["weighting_gap"]', 'sigma_nm if cfg["weighting_gap"]')],
        [f"{OBJ}::test_acd_fake_and_its_lambda_weighted_distance"]),
    "λ(σ) over the next gap σ_{n+1} − σ_n with weighting_gap jump": (
        "train/objectives.py", [("else sigma_nm\n", "else sigmas[n + 1]\n")],
        [f"{OBJ}::test_acd_fake_and_its_lambda_weighted_distance"]),
    "λ(σ) inverted": (
        "losses.py", [("weight = (1.0 / gap) ** 0.1", "weight = gap ** 0.1")],
        [f"{OBJ}::test_acd_fake_and_its_lambda_weighted_distance"]),
    "student.boundary not passed to the student's Denoiser": (
        "train/distill.py", [('Denoiser(network, boundary=st["boundary"],', "Denoiser(network,")],
        [f"{OBJ}::test_student_boundary_reaches_the_students_denoiser_in_build_nets"]),
    "pseudo-Huber c misplaced": (
        "losses.py", [("torch.sqrt(diff.square() + c * c) - c", "torch.sqrt(diff.square() + c) - c * c")],
        [f"{OBJ}::test_acd_fake_and_its_lambda_weighted_distance"]),
    "stage-1 fake at the wrong σ": (
        "train/objectives.py", [("consistency_fn(x, sigma, cond)", "consistency_fn(x, sigmas[n - 1], cond)")],
        [f"{OBJ}::test_lgp_real_is_x0_and_fake_is_the_student_at_sigma_n"]),
    "stage-1 real is the noisy x": (
        "train/objectives.py", [("return x0, fake, distance", "return x, fake, distance")],
        [f"{OBJ}::test_lgp_real_is_x0_and_fake_is_the_student_at_sigma_n"]),
    "hinge sign flipped in d_hinge_loss": (
        "losses.py", [("F.relu(1.0 + fake_logits)", "F.relu(1.0 - fake_logits)")],
        [f"{LOSSES}::test_d_hinge_loss_by_hand"]),
    "hinge sign flipped in g_loss": (
        "losses.py", [("return F.relu(1.0 - fake_logits).mean()", "return F.relu(1.0 + fake_logits).mean()")],
        [f"{LOSSES}::test_g_loss_by_hand"]),
    "G step backpropagates into D": (
        "train/distill.py", [("set_requires_grad(d_params, False)", "set_requires_grad(d_params, True)")],
        [f"{OBJ}::test_train_step_keeps_the_discriminator_and_student_updates_apart"]),
    "adversarial term detached from the student": (
        "train/distill.py", [("else nets.disc(fake)\n", "else nets.disc(fake.detach())\n")],
        [f"{OBJ}::test_train_step_keeps_the_discriminator_and_student_updates_apart"]),
    "TTS travels back with the wrong noise (ε̂₁ for ε̂₂)": (
        "samplers.py",
        [("x_back = f2 + s_max * (eps0 + eps2) / 2", "x_back = f2 + s_max * (eps0 + eps1) / 2")],
        [f"{SAMPLERS}::test_tts_equals_the_method_formula_and_counts_nfe"]),
    "consistency sampler skips the re-noise": (
        "samplers.py",
        [("x = x0 + schedule[i + 1].to(device) * _randn(shape, generator, device, dtype)", "x = x0")],
        [f"{SAMPLERS}::test_consistency_sample_with_exact_consistency_fn"]),
}


def run_tests(copy_root: Path, tests: list[str]) -> subprocess.CompletedProcess:
    """pytest on `tests` in a subprocess that imports osv from copy_root (cwd and PYTHONPATH come before
    the editable install; no bytecode is written, so a mutated source is never shadowed by a stale .pyc)."""
    env = {**os.environ, "PYTHONPATH": str(copy_root), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
           "--rootdir", str(REPO), *(str(REPO / t) for t in tests)]
    return subprocess.run(cmd, cwd=copy_root, env=env, capture_output=True, text=True, timeout=300)


def test_every_mutant_is_killed_by_a_test(tmp_path, capsys):
    shutil.copytree(REPO / "osv", tmp_path / "osv", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "workflow").symlink_to(REPO / "workflow")  # osv.params reads ../workflow/schemas
    probe = subprocess.run([sys.executable, "-c", "import osv; print(osv.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert probe.stdout.strip() == str(tmp_path / "osv" / "__init__.py"), probe
    clean = run_tests(tmp_path, sorted({t for _, _, tests in MUTANTS.values() for t in tests}))
    assert clean.returncode == 0, f"the selected tests fail without a mutation:\n{clean.stdout[-3000:]}"

    rows, survivors = [], []
    for name, (rel, edits, tests) in MUTANTS.items():
        path = tmp_path / "osv" / rel
        source = path.read_text()
        mutated = source
        for pattern, replacement in edits:
            count = mutated.count(pattern)
            assert count == 1, f"{name}: {pattern!r} occurs {count} times in {rel}"
            mutated = mutated.replace(pattern, replacement)
        path.write_text(mutated)
        try:
            result = run_tests(tmp_path, tests)
        finally:
            path.write_text(source)
        failed = [ln.split()[1].split("tests/", 1)[-1] for ln in result.stdout.splitlines() if ln.startswith("FAILED ")]
        if result.returncode == 1 and failed:  # 1: tests failed (not a collection or usage error)
            rows.append(f"{name} -> {failed[0]}")
        else:
            survivors.append(f"{name} (pytest rc {result.returncode})\n{result.stdout[-1500:]}")
            rows.append(f"{name} -> SURVIVED")
    with capsys.disabled():  # shown in the README's test command output, pass or fail
        print("\nmutant -> killing test\n" + "\n".join(rows))
    assert not survivors, "mutants not killed:\n" + "\n".join(survivors)
