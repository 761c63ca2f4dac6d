"""Checkpoints: atomic writes, weights_only training state, self-describing weights, exact resume."""
import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from engine_doubles import CLASS_NAMES, PixelClassifier, parameters, toy_config, toy_trainer

from semiseg.engine.checkpoint import STATE_FILE, capture_rng_state, resolve_checkpoint_dir, restore_rng_state, save_checkpoint, weights_file
from semiseg.weights import WeightsInfo, atomic_write, read_weights
from semiseg.engine.preemption import TrainingPreempted
from semiseg.engine.run_dir import should_resume
from semiseg.errors import CheckpointError, ConfigError


def test_atomic_write_leaves_no_partial_file_when_the_writer_crashes(tmp_path):
    target = tmp_path / "state.pt"
    atomic_write(target, lambda p: p.write_bytes(b"old"))

    def crash(p):
        p.write_bytes(b"half of the new conte")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_checkpoint_swap_is_atomic_when_serialisation_fails(tmp_path, monkeypatch):
    model = PixelClassifier()
    info = WeightsInfo({"model": {"arch": "toy"}}, CLASS_NAMES, [1, 2], "model")
    save_checkpoint(tmp_path / "last", {"model": model}, {"iteration": 1}, info)
    before = (tmp_path / "last" / "model.safetensors").read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.raises(CheckpointError, match=r"last: cannot write the checkpoint \(no space left on device\)"):
        save_checkpoint(tmp_path / "last", {"model": model}, {"iteration": 2}, info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary folder left behind
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == before
    assert torch.load(tmp_path / "last" / STATE_FILE, weights_only=True) == {"iteration": 1}


def test_interrupted_swap_falls_back_to_the_previous_checkpoint(tmp_path):
    info = WeightsInfo(None, [], [], "model")
    save_checkpoint(tmp_path / "last", {"model": PixelClassifier()}, {"iteration": 3}, info)
    (tmp_path / "last").rename(tmp_path / "last.previous")  # crash between the two renames
    assert resolve_checkpoint_dir(tmp_path / "last") == tmp_path / "last.previous"
    assert resolve_checkpoint_dir(tmp_path / "best") is None


def test_weights_describe_themselves_and_state_loads_weights_only(tmp_path):
    cfg = toy_config(tmp_path / "run", "solver.max_iter=2")
    trainer = toy_trainer(cfg)
    trainer.train()
    last = tmp_path / "run" / "checkpoints" / "last"
    tensors, info = read_weights(weights_file(last, "student"))  # "student" = the single supervised model
    assert info.name == "model" and info.class_names == CLASS_NAMES and info.category_ids == [1, 2]
    assert info.config["solver"]["max_iter"] == 2
    assert all(torch.equal(tensors[k], v) for k, v in trainer.model.state_dict().items())

    state = torch.load(last / STATE_FILE, weights_only=True)
    assert state["iteration"] == 2 and state["streams"] == {"labeled": 2}
    assert set(state) >= {"optimizer", "scheduler", "scaler", "rng", "best_metric", "skipped_steps"}
    assert len(state["optimizer"]["state"]) == len(list(trainer.model.parameters()))


def test_bad_weights_files_are_checkpoint_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors"):
        read_weights(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such weights file"):
        read_weights(tmp_path / "none.safetensors")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"no teacher.safetensors in this checkpoint \(found: none\)"):
        weights_file(tmp_path / "ckpt", "teacher")


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        toy_trainer(toy_config(tmp_path / "run"), resume=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(tmp_path, workers):
    """train N -> stop -> resume to 2N gives the parameters of an uninterrupted 2N run."""
    common = [f"data.num_workers={workers}", "train.log_period=1"]
    straight = toy_trainer(toy_config(tmp_path / "straight", "solver.max_iter=8", *common))
    straight.train()

    first = toy_trainer(toy_config(tmp_path / "resumed", "solver.max_iter=4", *common))
    first.train()
    torch.manual_seed(1234)  # a fresh process would not share the RNG state; resume must restore it
    resumed = toy_trainer(toy_config(tmp_path / "resumed", "solver.max_iter=8", *common), resume=True)
    assert resumed.iteration == 4
    resumed.train()

    expected, got = parameters(straight.model), parameters(resumed.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    losses = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in losses] == [r["loss"] for r in resumed_losses]
    assert expected["head.weight"].ne(parameters(first.model)["head.weight"]).any()  # training moved on after N


def test_resume_continues_exactly_with_the_real_tiny_mask2former(tmp_path):
    """Mask2Former samples random points in its loss: resume must restore the RNG states too."""
    from semiseg.config import load_config
    from semiseg.data.synthetic import write_synthetic_dataset
    from semiseg.training import build_trainer

    synth = write_synthetic_dataset(tmp_path / "data", num_train=6, num_val=2, seed=2, image_size=64)
    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic_mask2former_tiny.yaml"

    def run(output, max_iter, resume=False):
        cfg = load_config(config, [
            f"data.train_ann={synth['train_ann']}", f"data.train_images={synth['train_images']}",
            "data.val_ann=", f"train.output_dir={output}", "train.device=cpu", f"solver.max_iter={max_iter}",
            "data.batch_size=2", "data.num_workers=0", "data.augmentation.image_size=64",
            "model.mask2former.train_num_points=128", "solver.warmup_iters=0"])
        trainer = build_trainer(cfg, torch.device("cpu"), resume)
        trainer.train()
        return parameters(trainer.model)

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    torch.manual_seed(99)
    resumed = run(tmp_path / "resumed", 4, resume=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_auto_resume_continues_exactly(tmp_path, sig):
    straight = toy_trainer(toy_config(tmp_path / "straight", "solver.max_iter=8"))
    straight.train()
    run = tmp_path / "preempted"
    assert not should_resume(run, "auto")  # nothing there yet: a new run
    first = toy_trainer(toy_config(run, "solver.max_iter=8"))
    step = first.run_step

    def signalled_step(iteration):
        if iteration == 3:
            os.kill(os.getpid(), sig)  # as SLURM / Kubernetes would, in the middle of a step
        return step(iteration)

    first.run_step = signalled_step
    handler_before = signal.getsignal(sig)
    with pytest.raises(TrainingPreempted, match=rf"stopped by {sig.name} at iteration 4; checkpoint saved in "
                                                r".*last: continue with --resume"):
        first.train()
    assert signal.getsignal(sig) is handler_before  # the previous handler is back
    assert should_resume(run, "auto")
    torch.manual_seed(99)
    resumed = toy_trainer(toy_config(run, "solver.max_iter=8"), resume=True)
    assert resumed.iteration == 4
    resumed.train()
    expected, got = parameters(straight.model), parameters(resumed.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     PermissionError(errno.EROFS, "Read-only file system")])
def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    import semiseg.engine.checkpoint as checkpoint_module

    trainer = toy_trainer(toy_config(tmp_path / "run", "solver.max_iter=4", "train.checkpoint_period=2"))
    real_save = torch.save
    calls = []

    def failing_save(obj, path, *args, **kwargs):  # the training state of the 2nd checkpoint cannot be written
        calls.append(path)
        if len(calls) == 2:
            raise failure
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(CheckpointError) as info:
        trainer.train()
    message = str(info.value)
    assert message == (f"{tmp_path / 'run' / 'checkpoints' / 'last'}: cannot write the checkpoint ({failure.strerror}); "
                       f"the previous checkpoint there, if any, is unchanged")
    monkeypatch.undo()
    kept = resolve_checkpoint_dir(tmp_path / "run" / "checkpoints" / "last")
    assert torch.load(kept / STATE_FILE, weights_only=True)["iteration"] == 2  # the first one, still loadable
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last"]  # no temporary folder left
    resumed = toy_trainer(toy_config(tmp_path / "run", "solver.max_iter=4"), resume=True)
    assert resumed.iteration == 2


def test_cli_exits_with_the_preemption_status_and_one_line(monkeypatch, capsys):
    import semiseg.workflow
    from semiseg.cli import main
    from semiseg.engine.preemption import PREEMPTED_EXIT_STATUS

    def preempted(*args, **kwargs):
        raise TrainingPreempted("stopped by SIGTERM at iteration 7; checkpoint saved in run/checkpoints/last: "
                                "continue with --resume (or train.resume=auto)")

    monkeypatch.setattr(semiseg.workflow, "train", preempted)
    assert main(["train", "--config", "whatever.yaml"]) == PREEMPTED_EXIT_STATUS == 75
    assert capsys.readouterr().err == ("semiseg: stopped by SIGTERM at iteration 7; checkpoint saved in "
                                       "run/checkpoints/last: continue with --resume (or train.resume=auto)\n")
