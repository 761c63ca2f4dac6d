"""semiseg: semi-supervised instance segmentation with mask transformers, in plain PyTorch."""
from semiseg.structures import Batch, Instances

__all__ = ["Batch", "Instances", "load"]
__version__ = "0.1.0"


def load(weights, device=None, config=None):
    """Load a trained model for inference: `semiseg.load("model.safetensors").predict("image.jpg")`.

    See `semiseg.api.load` (imported lazily so `import semiseg` stays light).
    """
    from semiseg.api import load as _load

    return _load(weights, device=device, config=config)
