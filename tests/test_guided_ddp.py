"""Guided Distillation under two gloo processes on the CPU (what torchrun starts), through burn-in and EMA.

Each rank takes 1 labeled + 1 unlabeled image per iteration (global batches of 2); the student
runs two forwards (labeled, strong unlabeled) before one backward, which DDP must accept. At the end
both ranks hold the same student parameters and the same teacher (parameters and buffers), equal
to the checkpoint rank 0 wrote.
"""
import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from gd_helpers import gd_config

from semiseg.weights import read_weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, tmp: str, data_paths: dict) -> None:
    from semiseg.engine.distributed import destroy_distributed, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"))
    try:
        train_and_save(rank, tmp, data_paths)
    finally:
        destroy_distributed()


def train_and_save(rank: int, tmp: str, data_paths: dict) -> None:
    """Train this rank; its trainer is out of scope on return (so `destroy_distributed` frees its DDP)."""
    from semiseg.training import build_trainer

    cfg = gd_config(data_paths, Path(tmp) / "run", "solver.max_iter=3", "semi.burn_in_iter=1", "semi.ema_decay=0.5")
    trainer = build_trainer(cfg, torch.device("cpu"), resume=False)
    trainer.train()
    torch.save({"student": {k: p.detach() for k, p in trainer.student.named_parameters()},
                "teacher": trainer.teacher.state_dict()}, Path(tmp) / f"rank{rank}.pt")


def test_two_gloo_ranks_run_guided_distillation_in_step(data, tmp_path):  # noqa: F811
    mp.spawn(worker, args=(free_port(), str(tmp_path), data), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for part in ("student", "teacher"):
        assert rank0[part].keys() == rank1[part].keys()
        assert all(torch.equal(rank0[part][k], rank1[part][k]) for k in rank0[part]), part
    saved = read_weights(tmp_path / "run" / "checkpoints" / "last" / "teacher.safetensors")[0]
    assert all(torch.equal(saved[k], rank0["teacher"][k]) for k in saved)
    stage1 = read_weights(data["teacher"] / "model.safetensors")[0]
    assert not all(torch.equal(saved[k], stage1[k]) for k in saved)  # copied at burn-in, then EMA
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(r["loss_ce_unsup"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in records)
