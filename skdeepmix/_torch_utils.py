"""Device, dtype, random-state and array conversion helpers (the one place for them)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.utils import check_random_state

__all__ = [
    "resolve_device",
    "resolve_dtype",
    "make_generator",
    "to_tensor",
    "to_numpy",
    "iter_row_chunks",
]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
}


def resolve_device(device, *, fallback_to_cpu=False):
    """Turn a user ``device`` argument into a :class:`torch.device`.

    Parameters
    ----------
    device : {'auto', 'cpu', 'cuda', 'cuda:N'} or torch.device
        ``'auto'`` picks CUDA when it is available, else the CPU.
    fallback_to_cpu : bool, default=False
        When the requested CUDA device is not available, use the CPU instead of
        raising (used at predict time, so that a model fitted on a GPU and
        unpickled on a CPU-only machine still works).

    Returns
    -------
    device : torch.device
    """
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"Invalid device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'."
            ) from exc
    else:
        raise TypeError(
            f"device must be a string or a torch.device, got {type(device).__name__}."
        )
    if resolved.type == "cuda":
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = resolved.index or 0
        if index >= n_gpus:
            if fallback_to_cpu:
                return torch.device("cpu")
            raise ValueError(
                f"device={str(device)!r} was requested but this machine has "
                f"{n_gpus} CUDA device(s) available to torch; use device='cpu' or "
                "device='auto'."
            )
    elif resolved.type not in ("cpu", "mps"):
        raise ValueError(f"Unsupported device type {resolved.type!r}.")
    return resolved


def resolve_dtype(dtype):
    """Turn a user ``dtype`` argument into a floating :class:`torch.dtype`.

    Parameters
    ----------
    dtype : {'float32', 'float64'}, numpy dtype or torch.dtype

    Returns
    -------
    dtype : torch.dtype
        ``torch.float32`` or ``torch.float64``.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float64):
            return dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")


def make_generator(random_state, device):
    """A :class:`torch.Generator` on ``device`` seeded from ``random_state``.

    Parameters
    ----------
    random_state : None, int or numpy.random.RandomState
        As in scikit-learn. ``None`` draws a fresh seed from numpy's global RNG
        (so results differ between calls, as in scikit-learn).
    device : torch.device

    Returns
    -------
    generator : torch.Generator
    """
    seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def to_tensor(X, device, dtype):
    """Convert an array to a tensor on ``device`` with ``dtype``.

    No copy is made when ``X`` is already a CPU numpy array of that dtype and the
    device is the CPU. Read-only arrays (e.g. memory maps) are wrapped as they
    are; the package never writes into its input.
    """
    if isinstance(X, torch.Tensor):
        return X.to(device=device, dtype=dtype)
    X = np.asarray(X)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        tensor = torch.as_tensor(X)
    return tensor.to(device=device, dtype=dtype)


def to_numpy(tensor):
    """Detach a tensor, move it to the CPU and return a numpy array."""
    return tensor.detach().cpu().numpy()


def iter_row_chunks(n_rows, chunk_size):
    """Yield ``slice`` objects covering ``range(n_rows)`` in chunks."""
    chunk_size = max(int(chunk_size), 1)
    for start in range(0, n_rows, chunk_size):
        yield slice(start, min(start + chunk_size, n_rows))
