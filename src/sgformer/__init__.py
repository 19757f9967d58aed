"""SG-Former as a timm model family. Importing this package registers ``sgformer_*`` with timm."""

from .model import SGFormer, checkpoint_filter_fn, create_model

__all__ = ["SGFormer", "checkpoint_filter_fn", "create_model"]
__version__ = "0.1.0"
