"""Machinery shared by the teacher and the distillation loops: data order, per-sample noise,
precision, stop signals and the non-finite-loss guard.

Reproducibility: every random draw of iteration `step` comes from generators seeded by
(seed, step, global sample index, stream), never from global RNG state. So (a) a run resumed
from a checkpoint at step k continues bit for bit, and (b) a sample's noise does not depend on
which rank holds it: W processes x batch b see exactly the draws of 1 process x batch W·b.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Sequence

import numpy as np
import torch

from osv.numerics import NonFiniteError, require_finite

STREAMS = {"data": 0, "noise": 1, "index": 2, "dropout": 3, "sigma": 4, "eval": 5, "cfg": 6}


class NonFiniteLossError(NonFiniteError):
    """A loss became NaN/Inf: training stops and no checkpoint of that state is written."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGUSR2 arrived: a checkpoint was written at the step boundary, the run stops."""


def seed_for(seed: int, step: int, index: int, stream: str) -> int:
    """A 63-bit seed from (seed, step, sample index, stream) (numpy SeedSequence mixing)."""
    words = np.random.SeedSequence([seed, step, index, STREAMS[stream]]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def generator_for(seed: int, step: int, index: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, step, index, stream))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_items: int) -> tuple[int, ...]:
    return tuple(torch.randperm(num_items, generator=generator_for(seed, epoch, 0, "data")).tolist())


def data_indices(seed: int, step: int, global_batch: int, num_items: int) -> list[int]:
    """Global batch `step`: the next items of a fresh seeded permutation per epoch."""
    out = []
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch, k = divmod(pos, num_items)
        out.append(_epoch_permutation(seed, epoch, num_items)[k])
    return out


def sample_randn(shape: Sequence[int], seed: int, step: int, indices: Sequence[int], stream: str = "noise",
                 device=None) -> torch.Tensor:
    """[len(indices), *shape] standard normals; row j depends only on (seed, step, indices[j])."""
    rows = [torch.randn(tuple(shape), generator=generator_for(seed, step, i, stream)) for i in indices]
    return torch.stack(rows).to(device)


def sample_uniform_int(high: int, seed: int, step: int, indices: Sequence[int], stream: str = "index") -> torch.Tensor:
    """One integer in [0, high) per sample."""
    return torch.stack([torch.randint(0, high, (), generator=generator_for(seed, step, i, stream))
                        for i in indices])


def sample_rand(seed: int, step: int, indices: Sequence[int], stream: str) -> torch.Tensor:
    """One uniform [0, 1) per sample."""
    return torch.stack([torch.rand((), generator=generator_for(seed, step, i, stream)) for i in indices])


def collate(items: list[dict], device) -> dict:
    """Stack a list of LatentDataset items (tensors stacked, other values listed)."""
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals).to(device) if isinstance(vals[0], torch.Tensor) else vals
    return out


class Precision:
    """Autocast + GradScaler per train.precision; CPU always runs fp32 (schema)."""

    def __init__(self, precision: str, device: torch.device):
        self.device = device
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if device.type != "cuda":
            self.dtype = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype is torch.float16)
        self.overflow_count = 0

    @property
    def name(self) -> str:
        """The precision that actually runs: 'fp32' on CPU whatever train.precision says."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer, params, grad_clip: float) -> tuple[float, bool]:
        """Unscale, clip, step, update; (grad norm, skipped because of an fp16 overflow)."""
        self.scaler.unscale_(optimizer)
        norm = grad_norm(params, grad_clip)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.overflow_count += int(skipped)
        return norm, skipped


def grad_norm(params, clip: float) -> float:
    """Total L2 norm of the gradients; clip them to `clip` when clip > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def check_finite(stage: str, losses: dict[str, torch.Tensor], step: int, last_checkpoint) -> None:
    """Raise NonFiniteLossError naming the stage, loss, step and the last good checkpoint."""
    where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint written yet"
    try:
        require_finite(stage, losses, step, hint=f"stopping without checkpointing this state ({where})")
    except NonFiniteError as exc:
        raise NonFiniteLossError(str(exc)) from None


class StopSignal:
    """SIGTERM / SIGUSR2 set a flag; the loop checkpoints at the next step boundary and exits.

    The handlers found at install time are kept: after checkpointing, `chain()` calls a
    previous Python handler (submitit's USR2 handler requeues the job and exits). In a SLURM
    job, SIGTERM means preemption (or `scancel --signal=TERM`, or `scontrol requeue`), which
    submitit only ignores: it is handed to the USR2 handler too, so the job is requeued and
    resumes from the checkpoint just written instead of ending in failure.
    """

    SIGNALS = ("SIGTERM", "SIGUSR2")

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> StopSignal:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals to the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def chain(self) -> None:
        """Hand the signal to the handler that was installed before ours (if a Python one)."""
        import subprocess

        sig = self.received
        prev = self.previous.get(sig)
        usr2 = self.previous.get(getattr(signal, "SIGUSR2", None))
        if sig == signal.SIGTERM and os.environ.get("SLURM_JOB_ID") and callable(usr2):
            prev = usr2  # preempted: checkpoint() + requeue, as on a timeout
        self.restore()
        if callable(prev):
            try:
                prev(sig, None)
            except subprocess.CalledProcessError as exc:  # `scontrol requeue` is requeuing the job already
                # Leave without a result (as submitit's own requeue does): a result file of this
                # incarnation would end the wait before the requeued one runs.
                print(f"requeue after signal {sig} refused ({exc}): SLURM is requeuing the job", flush=True)
                raise SystemExit(1) from exc
