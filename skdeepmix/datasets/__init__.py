"""Data loaders (local paths only, nothing is downloaded) and toy data sets."""

from ._bsds300 import make_bsds300_patches
from ._mnist import load_fashion_mnist, load_mnist, read_idx
from ._toy import make_broken_rings, make_spiral_arms

__all__ = ["load_mnist", "load_fashion_mnist", "read_idx", "make_bsds300_patches",
           "make_broken_rings", "make_spiral_arms"]
