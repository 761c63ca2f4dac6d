"""semiseg: semi-supervised instance segmentation with mask transformers, in plain PyTorch."""
from semiseg.structures import Batch, Instances

__all__ = ["Batch", "Instances"]
__version__ = "0.1.0"
