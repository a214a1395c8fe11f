"""Fail fast on non-finite numbers, in every stage, and the NaN test hook.

A NaN that slips through one stage poisons every later one for hours (a NaN VAE encodes NaN
latents, the teacher trains on them...), so each stage checks its losses, weights and metrics
and stops with one line naming the stage, the step and the quantity.
"""

from __future__ import annotations

import math
import os

# Test hook: OSV_INJECT_NAN="<stage>:<step>" turns that stage's checked quantity at that step
# (0-based) into NaN, to prove the guard stops the stage without a complete-looking output.
INJECT_ENV = "OSV_INJECT_NAN"


class NonFiniteError(RuntimeError):
    """A loss, weight, latent or metric became NaN/Inf: the stage stops (exit code 3)."""

    exit_code = 3


def injected(stage: str, step: int) -> float:
    """1.0, or NaN when OSV_INJECT_NAN names this stage and step."""
    spec = os.environ.get(INJECT_ENV, "").strip()
    if not spec:
        return 1.0
    name, _, at = spec.partition(":")
    return math.nan if name == stage and at.strip() and int(at) == step else 1.0


def as_float(value) -> float:
    """A Python number or a 0-d/any tensor (checked as a whole) as one float for the test."""
    if hasattr(value, "detach"):
        import torch

        t = value.detach()
        return float(t) if t.numel() == 1 else (0.0 if bool(torch.isfinite(t).all()) else math.nan)
    return float(value)


def require_finite(stage: str, quantities: dict, step: int | None = None, hint: str = "") -> None:
    """Raise NonFiniteError naming every non-finite quantity (numbers or tensors)."""
    bad = {k: v for k, v in quantities.items() if not math.isfinite(as_float(v))}
    if bad:
        where = f" at step {step}" if step is not None else ""
        values = ", ".join(f"{k}={as_float(v)}" for k, v in bad.items())
        raise NonFiniteError(f"osv {stage}: non-finite {', '.join(bad)}{where} ({values})"
                             + (f"; {hint}" if hint else ""))


def require_finite_module(stage: str, module, what: str) -> None:
    """Every parameter of a torch module finite (checked once, before a model is saved)."""
    import torch

    bad = [n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"osv {stage}: non-finite weights in {what} ({len(bad)} tensors, "
                             f"first: {bad[0]}); nothing was saved")
