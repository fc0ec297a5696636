"""BSDS300 image patches in the standard density-estimation setup (Uria et al. 2013)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["make_bsds300_patches"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif"}


def make_bsds300_patches(image_folder, n_patches, patch_size=8, random_state=None):
    """Random grey patches from a folder of images, preprocessed as in the literature.

    The setup of Uria et al. (2013), used by the deep GMM paper: square grey
    patches at uniformly random positions of uniformly random images; pixel
    values ``v`` in ``{0, ..., 255}`` are dequantised as ``(v + u) / 256`` with
    ``u ~ U[0, 1)``; the mean of each patch is subtracted; the last pixel
    (now a linear function of the others) is dropped. For 8x8 patches this
    gives 63 features. Use the ``train`` images for training patches and the
    ``test`` images for test patches.

    Parameters
    ----------
    image_folder : str or path-like
        Folder with the images (e.g. ``.../BSDS300/images/train``); colour
        images are converted to grey with Pillow (``'L'`` mode).
    n_patches : int
        Number of patches to draw.
    patch_size : int, default=8
        Side of the square patches.
    random_state : int, RandomState instance or None, default=None
        Seeds the choice of images, positions and the dequantisation noise.

    Returns
    -------
    X : ndarray of shape (n_patches, patch_size**2 - 1), dtype float64
        Row-major flattened patches without their last pixel.

    Raises
    ------
    FileNotFoundError
        If the folder does not exist or holds no images.
    ImportError
        If Pillow is not installed.

    Examples
    --------
    >>> from skdeepmix.datasets import make_bsds300_patches  # doctest: +SKIP
    >>> X = make_bsds300_patches("BSDS300/images/train", 1000, random_state=0)  # doctest: +SKIP
    >>> X.shape  # doctest: +SKIP
    (1000, 63)
    """
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "make_bsds300_patches needs Pillow: pip install pillow (or skdeepmix[data])."
        ) from exc
    n_patches = int(n_patches)
    patch_size = int(patch_size)
    if n_patches < 1:
        raise ValueError(f"n_patches must be a positive integer, got {n_patches}.")
    if patch_size < 2:
        raise ValueError(f"patch_size must be an integer >= 2, got {patch_size}.")
    folder = Path(image_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {str(folder)!r} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"No images found in {str(folder)!r}.")
    rng = check_random_state(random_state)
    choice = rng.randint(len(files), size=n_patches)
    patches = np.empty((n_patches, patch_size, patch_size), dtype=np.float64)
    for index in np.unique(choice):
        with Image.open(files[index]) as image:
            grey = np.asarray(image.convert("L"), dtype=np.float64)
        height, width = grey.shape
        if height < patch_size or width < patch_size:
            raise ValueError(
                f"Image {files[index].name!r} ({height}x{width}) is smaller than "
                f"patch_size={patch_size}."
            )
        rows = np.flatnonzero(choice == index)
        tops = rng.randint(height - patch_size + 1, size=rows.size)
        lefts = rng.randint(width - patch_size + 1, size=rows.size)
        offsets = np.arange(patch_size)
        patches[rows] = grey[
            tops[:, None, None] + offsets[None, :, None],
            lefts[:, None, None] + offsets[None, None, :],
        ]
    patches = patches.reshape(n_patches, -1)
    patches = (patches + rng.uniform(0.0, 1.0, size=patches.shape)) / 256.0
    patches -= patches.mean(axis=1, keepdims=True)
    return patches[:, :-1]
