"""Shared test setup: one intra-op thread per test process (the suite runs on 2 shared cores;
tiny tensors are faster single-threaded, and pytest-xdist runs one process per core)."""
import pytest
import torch
from gd_helpers import TINY

from semiseg.config import Config, apply_overrides
from semiseg.data.splits import write_splits
from semiseg.data.synthetic import write_synthetic_dataset
from semiseg.training import train

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A tiny synthetic dataset, its 25 % labeled split with the unlabeled complement, and a stage-1
    teacher checkpoint (one supervised iteration): the Guided Distillation tests' shared setup."""
    root = tmp_path_factory.mktemp("gd")
    paths = write_synthetic_dataset(root / "synth", num_train=12, num_val=4, seed=0, image_size=64)
    write_splits(paths["train_ann"], [25], seed=0, out_dir=root / "splits", write_unlabeled=True)
    paths["labeled_ann"] = root / "splits" / "instances_train_25.json"
    paths["unlabeled"] = root / "splits" / "instances_train_25_unlabeled.json"
    stage1 = root / "stage1"
    train(apply_overrides(Config(), TINY + [
        f"data.train_ann={paths['labeled_ann']}", f"data.train_images={paths['train_images']}",
        f"train.output_dir={stage1}", "solver.max_iter=1"]))
    paths["teacher"] = stage1 / "checkpoints" / "last"
    paths["root"] = root
    return paths

