"""Data parallel: 2 gloo processes x batch b give the weights of 1 process x batch 2b (float tolerance)."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_train import ensure_latent_dataset, make_workspace, tiny_params, train

from osv.train.distributed import DistEnv, shard

RUN = "stage1"  # LGP with the discriminator: both models' gradients are averaged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, params: dict, ws: dict) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OSV_FORCE_CPU="1")
    ensure_latent_dataset()
    train(params, ws, Path(root), RUN)


def _weights(folder):
    return {f"{n}/{k}": v for n in ("student", "ema", "disc")
            for k, v in load_file(str(folder / f"{n}.safetensors")).items()}


def test_shard_splits_global_batch():
    assert shard(list(range(4)), DistEnv(rank=1, world_size=2)) == [2, 3]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    torch.set_num_threads(1)
    b, steps = 1, 2
    one = tiny_params({"lgp": {"steps": steps, "batch_size": 2 * b}})
    two = tiny_params({"lgp": {"steps": steps, "batch_size": b}})
    ws = make_workspace(tmp_path, one)
    single = tmp_path / "single"
    train(one, ws, single, RUN)
    double = tmp_path / "double"
    mp.spawn(_worker, args=(2, _free_port(), str(double), two, ws), nprocs=2, join=True)

    a, c = _weights(single / "models" / RUN), _weights(double / "models" / RUN)
    assert a.keys() == c.keys()
    moved = [k for k in a if k.startswith("student/") and ".lora_B" in k]
    assert any(a[k].abs().max() > 0 for k in moved)  # training did change the LoRA
    # Adam divides by sqrt(v): gradients that differ in the last float bits move a parameter whose
    # gradient is ~0 by up to ~lr per step, so the tolerance is a small fraction of lr x steps.
    for group, lr in (("student", one["lgp"]["lr"]), ("ema", one["lgp"]["lr"]), ("disc", one["lgp"]["lr_disc"])):
        worst = max((a[k] - c[k]).abs().max().item() for k in a if k.startswith(group))
        assert worst < 0.1 * lr * steps, f"{group}: max |1 proc - 2 procs| = {worst}"
    curve_one = (single / f"plots/train/{RUN}.csv").read_text().splitlines()[1].split(",")
    curve_two = (double / f"plots/train/{RUN}.csv").read_text().splitlines()[1].split(",")
    assert all(abs(float(x) - float(y)) <= 1e-4 * max(1.0, abs(float(x))) for x, y in zip(curve_one, curve_two))
    import json

    m = json.loads((double / f"metrics/train/{RUN}.json").read_text())
    assert m["protocol"]["world_size"] == 2 and m["protocol"]["global_batch"] == 2 * b
