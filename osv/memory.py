"""Activation memory: what autograd keeps for backward, and gradient checkpointing that covers it.

`saved_tensor_bytes(fn)` runs fn and sums the bytes of the distinct storages autograd saved for
backward (torch.autograd.graph.saved_tensors_hooks), plus the inputs held by `checkpoint` regions
(a non-reentrant checkpoint holds its inputs itself; `checkpoint` reports them, so they count
whether or not torch passes them through the hooks). Parameters
and buffers of `exclude` modules are not counted: they exist anyway. Under autocast their
low-precision copies are new storages and are counted (they live until backward). With
regions=True it also runs each checkpoint region once more, plainly, and reports the largest
region's own saved bytes: what backward holds on top while it recomputes that region.

`checkpoint` is torch.utils.checkpoint.checkpoint(use_reentrant=False) that reports its inputs to
an active `saved_tensor_bytes`; `checkpoint_module` is the same in diffusers'
`gradient_checkpointing_func` form (module, *args).

`checkpoint_whole(module)` turns a module into one checkpoint region (its class is swapped for a
subclass: same parameters, state-dict keys and outputs) that follows diffusers' switch:
`model.enable_gradient_checkpointing()` / `disable_gradient_checkpointing()` set its
`gradient_checkpointing` flag. Checkpoints diffusers would make inside it become plain calls, so
nothing is recomputed twice.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

_COUNTERS: list[_SavedCounter] = []  # active saved_tensor_bytes measurements (innermost last)


@dataclass
class SavedTensors:
    bytes: int  # saved for backward when fn returns (distinct storages)
    largest_region: int  # the largest checkpoint region's own saved bytes (regions=True; else 0)
    result: object  # fn's result
    region_bytes: list[int] = field(default_factory=list)  # each region's, in call order (regions=True)


class _SavedCounter:
    """Distinct storages seen by the pack hook or held by checkpoint regions, by data pointer."""

    def __init__(self, exclude: set[tuple[torch.device, int]], regions: bool = False):
        self.exclude = exclude
        self.regions = regions
        self.region_bytes: list[int] = []
        self.seen: dict[tuple[torch.device, int], list] = {}

    def add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            return
        key = (t.device, storage.data_ptr())
        if key in self.exclude or storage.nbytes() == 0:
            return
        self.seen.setdefault(key, []).append((weakref.ref(t), storage.nbytes()))

    def alive(self) -> set[tuple[torch.device, int]]:
        """Keys of the storages still held (a freed one's address may be reused by a new tensor)."""
        return {key for key, entries in self.seen.items() if any(ref() is not None for ref, _ in entries)}

    def total(self) -> int:
        """Bytes of the storages still alive (a storage freed during fn, whose address a later
        tensor may reuse, is not counted twice)."""
        total = 0
        for entries in self.seen.values():
            alive = [nbytes for ref, nbytes in entries if ref() is not None]
            total += max(alive, default=0)
        return total


def _storage_keys(exclude) -> set[tuple[torch.device, int]]:
    keys = set()
    for item in exclude:
        tensors = (list(item.parameters()) + list(item.buffers())) if isinstance(item, torch.nn.Module) else [item]
        for t in tensors:
            keys.add((t.device, t.untyped_storage().data_ptr()))
    return keys


def saved_tensor_bytes(fn: Callable, exclude: Iterable = (), regions: bool = False) -> SavedTensors:
    """What autograd keeps for backward after fn() (and fn's result, kept alive for the count).

    Counts each storage once (views and repeated saves of one tensor share it). `exclude`:
    modules (their parameters and buffers) or tensors whose storages are not counted.
    regions=True also measures each `checkpoint` region (one extra plain forward of each).
    """
    counter = _SavedCounter(_storage_keys(exclude), regions)
    result = _counted(counter, fn)
    return SavedTensors(counter.total(), max(counter.region_bytes, default=0), result, counter.region_bytes)


def _counted(counter: _SavedCounter, fn: Callable):
    def pack(t):
        counter.add(t)
        return t

    _COUNTERS.append(counter)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return fn()
    finally:
        _COUNTERS.remove(counter)


def _region_bytes(outer: _SavedCounter, fn: Callable, args, kwargs) -> int:
    """Saved bytes of fn(*args, **kwargs) run plainly, beyond what `outer` already holds."""
    inner = _SavedCounter(outer.exclude | outer.alive())
    devices = sorted({a.device.index for a in (*args, *kwargs.values())
                      if isinstance(a, torch.Tensor) and a.device.type == "cuda"})
    suspended = _COUNTERS[:]
    _COUNTERS.clear()  # the probe's saves and nested regions belong to `inner` only
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            result = _counted(inner, lambda: fn(*args, **kwargs))
            total = inner.total()
        del result
    finally:
        _COUNTERS[:] = suspended
    return total


def _report_inputs(args, kwargs) -> None:
    for counter in _COUNTERS:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                counter.add(a)


def checkpoint(fn: Callable, *args, **kwargs):
    """torch.utils.checkpoint (non-reentrant: works with frozen inputs, kwargs and peft layers)."""
    if _COUNTERS:
        _report_inputs(args, kwargs)
        for counter in [c for c in _COUNTERS if c.regions]:
            counter.region_bytes.append(_region_bytes(counter, fn, args, kwargs))
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)


def checkpoint_module(module: torch.nn.Module, *args, **kwargs):
    """diffusers' `gradient_checkpointing_func` signature: checkpoint module(*args)."""
    return checkpoint(module.__call__, *args, **kwargs)


def _plain_call(module: torch.nn.Module, *args, **kwargs):
    return module(*args, **kwargs)


class WholeCheckpoint:
    """Mixin of `checkpoint_whole`: forward is one checkpoint region while gradient_checkpointing is on."""

    def forward(self, *args, **kwargs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(super().forward, *args, **kwargs)
        return super().forward(*args, **kwargs)

    @property
    def _gradient_checkpointing_func(self):
        """diffusers checkpoints inner blocks through this: the whole module is the region instead."""
        return _plain_call

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, value) -> None:
        pass  # set by diffusers' _set_gradient_checkpointing; the outer region replaces it


_WHOLE_CLASSES: dict[type, type] = {}


def checkpoint_whole(module: torch.nn.Module) -> torch.nn.Module:
    """Make `module` one checkpoint region (in place; off until gradient_checkpointing is set True)."""
    cls = type(module)
    if issubclass(cls, WholeCheckpoint):
        return module
    if cls not in _WHOLE_CLASSES:
        sub = type(f"Checkpointed{cls.__name__}", (WholeCheckpoint, cls), {"__module__": __name__})
        globals()[sub.__name__] = sub  # picklable by name
        _WHOLE_CLASSES[cls] = sub
    flag = bool(module.__dict__.pop("gradient_checkpointing", False))
    module.__dict__.pop("_gradient_checkpointing_func", None)
    module.__class__ = _WHOLE_CLASSES[cls]
    module.gradient_checkpointing = flag
    return module

