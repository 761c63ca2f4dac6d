"""semiseg: semi-supervised instance segmentation with mask transformers, in plain PyTorch.

    semiseg.split(...) / semiseg.train(...) / semiseg.evaluate(...)   # semiseg/workflow.py
    semiseg.load(weights).predict(image)                              # semiseg/api.py

Both are imported on first use, so `import semiseg` stays light.
"""
from semiseg.structures import Batch, Instances

__all__ = ["Batch", "Instances", "evaluate", "load", "split", "train"]
__version__ = "0.1.0"


def load(weights, device=None, config=None):
    """Load a trained model for inference: `semiseg.load("model.safetensors").predict("image.jpg")`
    (`semiseg.api.load`)."""
    from semiseg.api import load as _load

    return _load(weights, device=device, config=config)


def train(config, *overrides, resume=False, **keyword_overrides):
    """Train from a config: `semiseg.train("config.yaml", solver__max_iter=500)` -> `TrainResult(run_dir,
    metrics)` (`semiseg.workflow.train`)."""
    from semiseg.workflow import train as _train

    return _train(config, *overrides, resume=resume, **keyword_overrides)


def evaluate(weights, *overrides, **options):
    """COCO AP of a checkpoint: {model name: metrics} (`semiseg.workflow.evaluate`)."""
    from semiseg.workflow import evaluate as _evaluate

    return _evaluate(weights, *overrides, **options)


def split(ann, percents, out_dir, **options):
    """Labeled splits of a COCO json; returns their paths (`semiseg.workflow.split`)."""
    from semiseg.workflow import split as _split

    return _split(ann, percents, out_dir, **options)
