"""Loaders for MNIST-format (IDX) data sets from a local folder."""

from __future__ import annotations

import gzip
import os

import numpy as np

__all__ = ["load_mnist", "load_fashion_mnist", "read_idx"]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path):
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    array : ndarray of uint8
        ``(n, rows, cols)`` for image files, ``(n,)`` for label files.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[0:4], "big")
    n_items = int.from_bytes(data[4:8], "big")
    if magic == 2051:
        rows = int.from_bytes(data[8:12], "big")
        cols = int.from_bytes(data[12:16], "big")
        return np.frombuffer(data, np.uint8, offset=16).reshape(n_items, rows, cols)
    if magic == 2049:
        return np.frombuffer(data, np.uint8, offset=8).copy()
    raise ValueError(f"{path}: not an IDX image or label file (magic number {magic}).")


def _find(folder, stem):
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"No file {stem}(.gz) in {folder!r}: pass the folder holding the four "
        "MNIST-format IDX files."
    )


def load_mnist(path, *, subset="train", n_samples=None, flatten=True, scale=True,
               digits=None, random_state=None):
    """Load MNIST (or any MNIST-format data set) from a local folder.

    Nothing is downloaded: ``path`` is a folder with the IDX files
    (``train-images-idx3-ubyte.gz`` etc.).

    Parameters
    ----------
    path : str or path-like
        Folder holding the IDX files.
    subset : {'train', 'test'}, default='train'
    n_samples : int, optional
        Return a random subset of this size (seeded by ``random_state``).
    flatten : bool, default=True
        Return ``(n, 784)`` instead of ``(n, 28, 28)``.
    scale : bool, default=True
        Return float32 values in ``[0, 1]`` instead of uint8 in ``[0, 255]``.
    digits : sequence of int, optional
        Keep only these classes.
    random_state : int, RandomState or None

    Returns
    -------
    X : ndarray of shape (n_samples, 784) or (n_samples, 28, 28)
    y : ndarray of shape (n_samples,)
    """
    from sklearn.utils import check_random_state

    if subset not in _FILES:
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}.")
    images, labels = (read_idx(_find(path, stem)) for stem in _FILES[subset])
    if digits is not None:
        keep = np.isin(labels, np.asarray(digits))
        images, labels = images[keep], labels[keep]
    if n_samples is not None and n_samples < len(labels):
        rng = check_random_state(random_state)
        index = np.sort(rng.choice(len(labels), size=n_samples, replace=False))
        images, labels = images[index], labels[index]
    if flatten:
        images = images.reshape(len(images), -1)
    if scale:
        images = images.astype(np.float32) / 255.0
    return images, labels.astype(np.int64)


def load_fashion_mnist(path, **kwargs):
    """Load Fashion-MNIST from a local folder (same IDX format as MNIST).

    See :func:`load_mnist` for the parameters.
    """
    return load_mnist(path, **kwargs)
