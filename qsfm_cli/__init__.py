"""qsfm_cli: filter pruning by quantified similarity of feature maps, and the classic criteria beside it.

The stages are plain functions (``qsfm_cli.pipeline``); ``qsfm-run`` is their Hydra front end.
"""
from .outputs import load_pruned, save_pruned

__all__ = ["load_pruned", "save_pruned"]
__version__ = "0.1.0"
