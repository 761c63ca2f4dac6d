"""Started by `torchrun` in tests/test_torchrun.py: the engine's Trainer, DDP and checkpoints on the
deterministic double (`engine_doubles`), so that every launch mode can be compared with one process.

    torchrun ... tests/torchrun_toy.py OUT [KILL_AT [MAX_ITER]]

Trains 8 (or MAX_ITER) iterations of global batch 4 into OUT/run with `train.resume: auto` and a checkpoint every
2 iterations, then saves each rank's parameters to OUT/rankR.pt. KILL_AT: on the first attempt
(TORCHELASTIC_RESTART_COUNT 0) rank 1 SIGKILLs itself at the start of that iteration, so an
elastic restart (`--max-restarts`) has to resume from the last checkpoint.
"""
import os
import signal
import sys
from pathlib import Path

import torch
from engine_doubles import parameters, toy_config, toy_trainer

from semiseg.engine.distributed import destroy_distributed, get_rank, get_world_size, init_distributed
from semiseg.engine.run_dir import should_resume

TOY_OVERRIDES = ("data.batch_size=4", "solver.max_iter=8", "train.checkpoint_period=2", "train.log_period=1",
                 "train.resume=auto")


def train_and_save(out: Path, kill_at: int, max_iter: str) -> None:
    """Train this rank (the trainer is out of scope on return, so `destroy_distributed` can free its DDP)."""
    cfg = toy_config(out / "run", *TOY_OVERRIDES, f"solver.max_iter={max_iter}")
    rank = get_rank()
    trainer = toy_trainer(cfg, resume=should_resume(out / "run", "auto"), rank=rank, world_size=get_world_size())
    if rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        step = trainer.run_step

        def dying_step(iteration: int):
            if iteration == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(iteration)

        trainer.run_step = dying_step
    trainer.train()
    torch.save(parameters(trainer.model), out / f"rank{rank}.pt")


def main() -> None:
    out, kill_at = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else -1
    max_iter = sys.argv[3] if len(sys.argv) > 3 else "8"
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"))
    try:
        train_and_save(out, kill_at, max_iter)
    finally:
        destroy_distributed()

if __name__ == "__main__":
    main()
