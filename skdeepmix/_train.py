"""One small mini-batch gradient loop shared by the gradient-trained estimators.

An estimator's ``_fit_iteration`` is one epoch; it calls :func:`train_epoch`
with a loss function of a mini-batch. The generic ``n_init``/``max_iter``/``tol``
loop, convergence and divergence checks live in :class:`~skdeepmix._base.BaseDeepMixture`.
An estimator's optional ``_partial_fit_step`` (``partial_fit``) is one call of
:func:`train_step`.

Distributed training (``DistributedDataParallel`` semantics): when the
estimator declares ``_distributed_mode = 'gradients'`` and torch.distributed is
initialised with several processes, the base class switches gradient
averaging on for the duration of ``fit``/``partial_fit``; :func:`train_step`
then averages the gradients over the processes (:func:`sync_gradients`, one
all-reduce per step, which also sums the loss so that a non-finite loss stops
every process together) and :func:`train_epoch` makes every process take the
same number of steps (the processes with fewer rows wrap around their shuffled
rows, as ``DistributedSampler`` pads) and returns the loss averaged over all
processes. Start all processes from the same parameters (the base class
broadcasts the state after ``_initialize``). Nothing changes for one process.
"""

from __future__ import annotations

import math

import torch

from . import _distributed
from ._distributed import gradient_sync_enabled, sync_gradients

__all__ = ["iter_minibatches", "train_epoch", "train_step", "make_optimizer", "sync_gradients"]


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
    yield from _minibatches(n_samples, batch_size, generator, shuffle, drop_last, None)


def _n_batches(n_samples, batch_size, drop_last):
    batch_size = max(1, min(int(batch_size), n_samples))
    full, rest = divmod(n_samples, batch_size)
    return full + (1 if rest and not (drop_last and full > 0) else 0)


def _minibatches(n_samples, batch_size, generator, shuffle, drop_last, n_batches):
    """Mini-batches; with ``n_batches`` larger than one pass, wrap around."""
    device = generator.device
    if shuffle:
        order = torch.randperm(n_samples, generator=generator, device=device)
    else:
        order = torch.arange(n_samples, device=device)
    batch_size = max(1, min(int(batch_size), n_samples))
    own = _n_batches(n_samples, batch_size, drop_last)
    if n_batches is not None and n_batches > own:
        repeats = -(-n_batches * batch_size // n_samples)
        order = order.repeat(repeats)
        for i in range(n_batches):
            yield order[i * batch_size : (i + 1) * batch_size]
        return
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
    n_batches = None
    if gradient_sync_enabled():  # the same number of steps on every process
        own = _n_batches(X.shape[0], batch_size, drop_last)
        n_batches = int(_distributed.all_reduce_scalar(own, "max"))
    batches = _minibatches(X.shape[0], batch_size, generator, True, drop_last, n_batches)
    for batch in batches:
        Xb = X[batch]
        yb = None if y is None else y[batch]
        value, n = _step(loss_fn, optimizer, Xb, yb, max_grad_norm, parameters)
        if not math.isfinite(value):
            return math.nan
        total += value * n
        count += n
    return total / max(count, 1)


def train_step(loss_fn, optimizer, X, y=None, *, max_grad_norm=None, parameters=None):
    """One optimizer step on the batch ``X`` (e.g. for ``_partial_fit_step``).

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(X)`` or ``loss_fn(X, y)`` returning a scalar loss tensor
        (mean over the batch; lower is better).
    optimizer : torch.optim.Optimizer
    X : Tensor of shape (batch, ...)
    y : Tensor of shape (batch,), optional
    max_grad_norm : float, optional
        Clip the global gradient norm of ``parameters`` to this value.
    parameters : iterable of Tensor, optional

    Returns
    -------
    loss : float
        The batch loss (under distributed training, the sample-weighted mean
        over the processes' batches); ``nan`` (and no step) if non-finite.

    Examples
    --------
    >>> def _partial_fit_step(self, X, generator, y=None):  # doctest: +SKIP
    ...     return -train_step(lambda b: -self.module_(b).mean(), self._optimizer, X)
    """
    parameters = list(parameters) if parameters is not None else None
    value, _ = _step(loss_fn, optimizer, X, y, max_grad_norm, parameters)
    return value


def _step(loss_fn, optimizer, X, y, max_grad_norm, parameters):
    """zero_grad, loss, backward, (gradient averaging), clipping, step."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(X) if y is None else loss_fn(X, y)
    value = float(loss.detach())
    n = int(X.shape[0])
    if gradient_sync_enabled():
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        extra = torch.tensor([value * n if math.isfinite(value) else math.nan, n],
                             dtype=torch.float64)
        summed = sync_gradients(params, extra).double()
        value, n = float(summed[0] / summed[1]), int(summed[1])
        if not math.isfinite(value):
            return math.nan, n
    else:
        if not math.isfinite(value):
            return math.nan, n
        loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    return value, n
