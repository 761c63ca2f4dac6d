"""Settings and helpers of the Guided Distillation tests (the shared `data` fixture is in conftest.py)."""
import torch

from semiseg.config import Config, apply_overrides
from semiseg.engine.run_dir import close_run_log
from semiseg.training import build_trainer
from semiseg.weights import read_weights

TINY = ["model.weights=null", "model.backbone.name=tiny_resnet", "model.mask2former.hidden_dim=32", "model.mask2former.conv_dim=32",
        "model.mask2former.mask_dim=32", "model.mask2former.nheads=4", "model.mask2former.dim_feedforward=64",
        "model.mask2former.enc_dim_feedforward=64", "model.mask2former.enc_layers=1",
        "model.mask2former.dec_layers=2", "model.mask2former.num_queries=8", "model.mask2former.test_topk=10",
        "model.mask2former.train_num_points=128", "data.augmentation.image_size=64",
        "data.augmentation.test_short_edge=64", "data.augmentation.test_max_size=64", "data.batch_size=2",
        "data.unlabeled_batch_size=2", "data.num_workers=0", "solver.amp=none", "solver.lr=1e-3",
        "train.device=cpu", "train.log_period=1", "train.checkpoint_period=1000", "train.eval_period=1000"]


def gd_config(data, out, *overrides) -> Config:
    """Stage 2 on the fixture's data; thresholds at 0 so that even an untrained teacher gives pseudo-labels."""
    return apply_overrides(Config(), TINY + [
        f"data.train_ann={data['labeled_ann']}", f"data.train_images={data['train_images']}",
        f"data.unlabeled={data['unlabeled']}", f"data.unlabeled_images={data['train_images']}",
        f"train.output_dir={out}", "semi.enabled=true", f"semi.teacher_weights={data['teacher']}",
        "semi.pseudo_labels.score_threshold=0.0", "semi.pseudo_labels.min_area=0", *overrides])


def built(cfg: Config):
    """`build_trainer` as `semiseg train` runs it (without training), its log files closed again."""
    try:
        return build_trainer(cfg, torch.device("cpu"), resume=False)
    finally:
        close_run_log()


def weights_of(folder, name):
    return read_weights(folder / f"{name}.safetensors")[0]


def equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
