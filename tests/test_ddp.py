"""Two gloo processes on the CPU: DDP training equals one process with the same global batch.

One spawn runs both checks (process start-up dominates the cost):
- the deterministic double with global batch 4 (2 per rank) ends with the parameters of a single
  process with batch 4;
- the real tiny Mask2Former (random point sampling per rank) ends with identical parameters on both
  ranks, finite losses, and a validation set evaluated across both ranks (predictions gathered).
"""
import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from engine_doubles import parameters, toy_config, toy_trainer

from semiseg.config import load_config

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_model_overrides(synth: dict, run: Path) -> list[str]:
    return [f"data.train_ann={synth['train_ann']}", f"data.train_images={synth['train_images']}",
            f"data.val_ann={synth['val_ann']}", f"data.val_images={synth['val_images']}", f"train.output_dir={run}",
            "train.device=cpu", "solver.max_iter=3", "train.eval_period=3", "train.log_period=1",
            "data.batch_size=4", "data.num_workers=0", "data.augmentation.image_size=64",
            "data.augmentation.test_short_edge=64", "data.augmentation.test_max_size=64",
            "model.mask2former.train_num_points=256"]


def worker(rank: int, port: int, tmp: str, synth: dict) -> None:
    from semiseg.engine.distributed import destroy_distributed, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"))
    try:
        train_and_save(rank, tmp, synth)
    finally:
        destroy_distributed()


def train_and_save(rank: int, tmp: str, synth: dict) -> None:
    """Both trainings of this rank; their trainers are out of scope on return (see `destroy_distributed`)."""
    from semiseg.training import build_trainer

    toy = toy_trainer(toy_config(Path(tmp) / "toy_ddp", "data.batch_size=4"), rank=rank, world_size=2)
    toy.train()
    torch.save(parameters(toy.model), Path(tmp) / f"toy_rank{rank}.pt")

    cfg = load_config(REPO / "configs" / "synthetic_mask2former_tiny.yaml",
                      real_model_overrides(synth, Path(tmp) / "m2f_ddp"))
    trainer = build_trainer(cfg, torch.device("cpu"), resume=False)
    trainer.train()
    # Parameters only: BatchNorm running statistics are rank-local between forwards (DDP copies
    # rank 0's buffers at the start of every forward, and checkpoints come from rank 0).
    torch.save({k: p.detach() for k, p in trainer.model.named_parameters()}, Path(tmp) / f"m2f_rank{rank}.pt")


def test_two_gloo_ranks_match_one_process(tmp_path):
    from semiseg.data.synthetic import write_synthetic_dataset

    synth = {k: str(v) for k, v in write_synthetic_dataset(tmp_path / "data", num_train=8, num_val=4, seed=1,
                                                             image_size=64).items()}
    mp.spawn(worker, args=(free_port(), str(tmp_path), synth), nprocs=2, join=True)

    single = toy_trainer(toy_config(tmp_path / "toy_single", "data.batch_size=4"))
    single.train()
    expected = parameters(single.model)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"toy_rank{rank}.pt", weights_only=True)
        assert all(torch.allclose(got[k], expected[k], atol=1e-5) for k in expected), rank

    rank0 = torch.load(tmp_path / "m2f_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "m2f_rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    records = [json.loads(line) for line in (tmp_path / "m2f_ddp" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    evaluation = [r for r in records if "eval" in r][0]["eval"]["model"]
    assert set(evaluation) == {"segm", "bbox"} and evaluation["segm"]["AP"] >= 0
    assert (tmp_path / "m2f_ddp" / "checkpoints" / "last" / "model.safetensors").is_file()


def test_destroy_distributed_frees_a_ddp_model_held_by_a_reference_cycle(tmp_path):
    """Otherwise gloo's group outlives it until interpreter shutdown, where it can abort the process."""
    import gc
    import weakref

    from semiseg.engine.distributed import destroy_distributed, wrap_ddp

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    gc.disable()  # only destroy_distributed may collect the cycle
    try:
        ddp = wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu"))
        ddp.cycle = [ddp]
        alive = weakref.ref(ddp)
        del ddp
        assert alive() is not None
        destroy_distributed()
        assert alive() is None and not torch.distributed.is_initialized()
    finally:
        gc.enable()
