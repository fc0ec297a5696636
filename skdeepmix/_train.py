"""One small mini-batch gradient loop shared by the gradient-trained estimators.

An estimator's ``_fit_iteration`` is one epoch; it calls :func:`train_epoch`
with a loss function of a mini-batch. The generic ``n_init``/``max_iter``/``tol``
loop, convergence and divergence checks live in :class:`~skdeepmix._base.BaseDeepMixture`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["iter_minibatches", "train_epoch", "make_optimizer"]


def iter_minibatches(n_samples, batch_size, generator, *, shuffle=True, drop_last=False):
    """Yield index tensors of mini-batches covering ``range(n_samples)``.

    Parameters
    ----------
    n_samples : int
    batch_size : int
    generator : torch.Generator
        Seeds the shuffling; the indices live on the generator's device.
    shuffle : bool, default=True
    drop_last : bool, default=False
        Drop a last, smaller batch (unless it is the only one).

    Yields
    ------
    indices : LongTensor of shape (batch,)
    """
    device = generator.device
    if shuffle:
        order = torch.randperm(n_samples, generator=generator, device=device)
    else:
        order = torch.arange(n_samples, device=device)
    batch_size = max(1, min(int(batch_size), n_samples))
    for start in range(0, n_samples, batch_size):
        batch = order[start : start + batch_size]
        if drop_last and start > 0 and batch.numel() < batch_size:
            break
        yield batch


def make_optimizer(name, parameters, learning_rate):
    """Build a torch optimizer by name ('adam', 'adamw', 'sgd', 'rmsprop')."""
    optimizers = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "rmsprop": torch.optim.RMSprop,
    }
    if name not in optimizers:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {sorted(optimizers)}.")
    return optimizers[name](parameters, lr=learning_rate)


def train_epoch(
    loss_fn,
    optimizer,
    X,
    batch_size,
    generator,
    *,
    y=None,
    max_grad_norm=None,
    parameters=None,
    drop_last=False,
):
    """One pass of mini-batch gradient descent over ``X``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(X_batch)`` or ``loss_fn(X_batch, y_batch)`` returning a scalar
        loss tensor (mean over the batch; lower is better).
    optimizer : torch.optim.Optimizer
    X : Tensor of shape (n_samples, ...)
    batch_size : int
    generator : torch.Generator
    y : Tensor of shape (n_samples,), optional
    max_grad_norm : float, optional
        Clip the global gradient norm of ``parameters`` to this value.
    parameters : iterable of Tensor, optional
        The parameters to clip (required with ``max_grad_norm``).
    drop_last : bool, default=False

    Returns
    -------
    mean_loss : float
        Sample-weighted mean of the batch losses (``nan`` if any was non-finite).
    """
    total, count = 0.0, 0
    parameters = list(parameters) if parameters is not None else None
    for batch in iter_minibatches(X.shape[0], batch_size, generator, drop_last=drop_last):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(X[batch]) if y is None else loss_fn(X[batch], y[batch])
        value = float(loss.detach())
        if not math.isfinite(value):
            return math.nan
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        total += value * batch.numel()
        count += batch.numel()
    return total / max(count, 1)
