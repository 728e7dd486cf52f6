"""Optimizer wrappers: torch.optim.Optimizer subclasses over fused kernels."""

from .adamw import AdamW
from .lamb import LAMB
from .lion import Lion
from .rmspropw import RMSpropW
from .sgdw import SGDW
from .stableadamw import StableAdamW

__all__ = ["AdamW", "SGDW", "RMSpropW", "Lion", "LAMB", "StableAdamW"]
