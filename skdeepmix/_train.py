"""The one training loop of the package: mini-batches, progress, divergence.

Every gradient-trained part of every estimator (pre-training, teachers,
curriculum stages, the main epochs, ``partial_fit`` steps) runs through
:func:`train_epoch` or :func:`train_step`, so that they share

* one clipping rule (``max_grad_norm``, the global gradient norm),
* one divergence check (a non-finite loss or parameter, or a loss that blew
  up within an epoch, raises :class:`TrainingDivergedError` naming the
  estimator, the phase and the learning rate),
* sample weights (the loss of a batch is the weighted mean of the per-sample
  losses),
* ``torch.distributed`` gradient averaging (``DistributedDataParallel``
  semantics: when the base class switched it on, every step all-reduces the
  gradients, and every process takes the same number of steps),
* no host synchronisation inside an epoch (the epoch's loss is accumulated
  on the device and read once).

:class:`Progress` is the one progress bar of a fit: every phase advances it,
and it ends at 100 % when a fit converges early. The generic
``n_init``/``max_iter``/``tol`` loop lives in :class:`~skdeepmix._base.BaseDeepMixture`.
"""

from __future__ import annotations

import math

import torch

from . import _distributed
from ._distributed import gradient_sync_enabled, sync_gradients

__all__ = [
    "TrainingDivergedError",
    "Progress",
    "iter_minibatches",
    "count_batches",
    "make_optimizer",
    "train_epoch",
    "train_step",
    "smoothed_converged",
]


class TrainingDivergedError(FloatingPointError, ValueError):
    """Raised when training blew up: a NaN/inf loss, parameter or objective,
    or a loss far above where the epoch started."""


# ---------------------------------------------------------------- progress
class Progress:
    """One progress bar per fit, covering every phase (a no-op when silent).

    Parameters
    ----------
    estimator : BaseDeepMixture
        Reads ``verbose`` and ``verbose_interval``.
    total : int
        Steps of the whole fit (all phases, all initialisations).
    tasks : object, optional
        The fit's scikit-learn callback tasks (``skdeepmix._base._FitTasks``):
        a step of an auxiliary phase (``step(phase=...)``) is reported to them.
    """

    def __init__(self, estimator, total, tasks=None):
        self.tasks = tasks
        self.verbose = int(estimator.verbose or 0)
        self.interval = int(getattr(estimator, "verbose_interval", 10) or 10)
        self.name = type(estimator).__name__
        self.bar = None
        if self.verbose and total > 0 and _distributed.is_main_process():
            from tqdm.auto import tqdm

            # left on screen: the last state a user sees is the finished fit (100 %)
            self.bar = tqdm(total=int(total), desc=self.name, leave=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def set_description(self, text):
        if self.bar is not None:
            self.bar.set_description(text)

    def step(self, n=1, **postfix):
        """Advance by ``n`` steps, showing ``postfix`` (e.g. ``phase``, ``loss``)."""
        if self.tasks is not None and "phase" in postfix:
            self.tasks.phase_step(postfix["phase"])
        if self.bar is None:
            return
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(
                {k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                refresh=False,
            )

    def skip(self, n):
        """Skip ``n`` steps (the iterations a converged run did not need)."""
        if self.bar is not None and n > 0:
            self.bar.update(n)

    def report(self, n_iter, objective, change):
        """With ``verbose >= 2``, print a line every ``verbose_interval`` iterations."""
        if self.verbose > 1 and n_iter % self.interval == 0 and _distributed.is_main_process():
            line = f"  Iteration {n_iter}\t objective {objective:.6g}\t change {change:.3g}"
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line)

    def finish(self):
        """Fill the bar to 100 % (the fit is done) and draw it."""
        if self.bar is not None:
            self.bar.update(max(self.bar.total - self.bar.n, 0))
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------- batches
def iter_minibatches(n_samples, batch_size, generator, *, shuffle=True, drop_last=False,
                     n_batches=None):
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
    n_batches : int, optional
        Make exactly this many batches, wrapping around the shuffled rows
        when it is more than one pass (as ``DistributedSampler`` pads).

    Yields
    ------
    indices : LongTensor of shape (batch,)
    """
    device = generator.device
    if n_samples == 0:
        return
    if shuffle:
        order = torch.randperm(n_samples, generator=generator, device=device)
    else:
        order = torch.arange(n_samples, device=device)
    batch_size = max(1, min(int(batch_size), n_samples))
    own = count_batches(n_samples, batch_size, drop_last)
    if n_batches is not None and n_batches > own:
        order = order.repeat(-(-n_batches * batch_size // n_samples))
        for i in range(n_batches):
            yield order[i * batch_size : (i + 1) * batch_size]
        return
    for start in range(0, n_samples, batch_size):
        batch = order[start : start + batch_size]
        if drop_last and start > 0 and batch.numel() < batch_size:
            break
        yield batch


def count_batches(n_samples, batch_size, drop_last=False):
    """Number of mini-batches of one pass over ``n_samples`` rows."""
    if n_samples == 0:
        return 0
    batch_size = max(1, min(int(batch_size), n_samples))
    full, rest = divmod(n_samples, batch_size)
    return full + (1 if rest and not (drop_last and full > 0) else 0)


def make_optimizer(name, parameters, learning_rate):
    """Build a torch optimizer by name ('adam', 'adamw', 'sgd', 'rmsprop').

    ``parameters`` may be a list of tensors or of param-group dicts (e.g.
    with per-group ``lr``). Adam, AdamW and SGD use torch's fused
    implementation (one kernel for all parameters; several times faster than
    the per-tensor loop on a CPU) where the parameters' device supports it.
    """
    optimizers = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "rmsprop": torch.optim.RMSprop,
    }
    if name not in optimizers:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {sorted(optimizers)}.")
    parameters = list(parameters)
    if name != "rmsprop":  # torch has no fused RMSprop
        try:
            return optimizers[name](parameters, lr=learning_rate, fused=True)
        except RuntimeError:  # a device without a fused kernel
            pass
    return optimizers[name](parameters, lr=learning_rate)


# ---------------------------------------------------------------- epochs
def train_epoch(loss_fn, optimizer, X, ctx, *, batch_size, phase="training", y=None,
                sample_weight=None, max_grad_norm=None, drop_last=False, owner=None):
    """One pass of mini-batch gradient descent over ``X``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(X_batch)`` or ``loss_fn(X_batch, y_batch)`` returning the
        per-sample losses, shape (batch,) (or their mean, a scalar); lower is
        better.
    optimizer : torch.optim.Optimizer
    X : Tensor of shape (n_samples, ...)
    ctx : FitContext
        Its generator shuffles the rows.
    batch_size : int
    phase : str, default="training"
        Named in the divergence error (e.g. "pre-training").
    y : Tensor of shape (n_samples,), optional
    sample_weight : Tensor of shape (n_samples,), optional
        The batch loss is the weighted mean of the per-sample losses.
    max_grad_norm : float, optional
        Clip the global gradient norm of the optimizer's parameters.
    drop_last : bool, default=False
    owner : str, optional
        Name of the estimator, for the error message.

    Returns
    -------
    mean_loss : float
        Sample-weighted mean of the batch losses (read once per epoch).

    Raises
    ------
    TrainingDivergedError
        If the loss or a parameter became NaN/inf, or the epoch's mean loss
        is far above its first batch's loss.
    """
    n_batches = None
    if gradient_sync_enabled():  # the same number of steps on every process
        own = count_batches(X.shape[0], batch_size, drop_last)
        n_batches = int(_distributed.all_reduce_scalar(own, "max"))
    total, count, first = None, 0.0, None
    batches = iter_minibatches(X.shape[0], batch_size, ctx.generator, drop_last=drop_last,
                               n_batches=n_batches)
    for batch in batches:
        yb = None if y is None else y[batch]
        wb = None if sample_weight is None else sample_weight[batch]
        loss, n = _step(loss_fn, optimizer, X[batch], yb, wb, max_grad_norm)
        total = loss * n if total is None else total + loss * n
        count += n
        if first is None:
            first = loss
    if total is None:  # no rows here (an empty shard): join the others' steps
        return math.nan
    summary = torch.stack([total / count, first]).double().tolist()  # one sync
    mean_loss, first_loss = summary
    _check_training(optimizer, mean_loss, first_loss, phase, owner)
    return mean_loss


def train_step(loss_fn, optimizer, X, ctx=None, *, y=None, sample_weight=None,
               max_grad_norm=None, phase="partial_fit", owner=None):
    """One optimizer step on the batch ``X`` (e.g. for ``_partial_fit_step``).

    Parameters are those of :func:`train_epoch`.

    Returns
    -------
    loss : float
        The batch loss before the step (under distributed training, the
        sample-weighted mean over the processes' batches).
    """
    loss, _ = _step(loss_fn, optimizer, X, y, sample_weight, max_grad_norm)
    value = float(loss)
    _check_training(optimizer, value, value, phase, owner)
    return value


def _step(loss_fn, optimizer, X, y, weights, max_grad_norm):
    """zero_grad, loss, backward, (gradient averaging), clipping, step.

    Returns the batch loss as a 0-d tensor (no host sync) and the batch's
    total weight (a float known on the host).
    """
    optimizer.zero_grad(set_to_none=True)
    losses = loss_fn(X) if y is None else loss_fn(X, y)
    if losses.dim() == 0:
        if weights is not None:
            raise ValueError("sample_weight needs a loss_fn that returns per-sample losses.")
        loss, n = losses, float(X.shape[0])
    elif weights is None:
        loss, n = losses.mean(), float(losses.shape[0])
    else:
        n_tensor = weights.sum()
        loss = (losses * weights).sum() / n_tensor.clamp_min(torch.finfo(weights.dtype).tiny)
        n = float(X.shape[0])  # batches are weighted by their size, like unweighted ones
    loss.backward()
    if gradient_sync_enabled():
        params = [p for group in optimizer.param_groups for p in group["params"]]
        extra = torch.stack([loss.detach() * n, loss.new_tensor(n)])
        summed = sync_gradients(params, extra)
        loss, n = summed[0] / summed[1], n  # the global mean; steps stay per process
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return loss.detach(), n


def _check_training(optimizer, mean_loss, first_loss, phase, owner):
    """Raise :class:`TrainingDivergedError` when the epoch blew up."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    finite_params = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) \
        if params else True
    # a blow-up is a rise of two orders of magnitude of the loss's scale within
    # one epoch (a learning rate far too large), not the noise of a small batch
    blew_up = math.isfinite(first_loss) and mean_loss > first_loss + 100.0 * max(abs(first_loss), 1.0)
    if math.isfinite(mean_loss) and finite_params and not blew_up:
        return
    rate = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
    learning_rate = "?" if rate is None else f"{rate:g}"
    what = (
        f"the loss became {mean_loss}" if not math.isfinite(mean_loss)
        else "a parameter became NaN or infinite" if not finite_params
        else f"the loss rose from {first_loss:.4g} to {mean_loss:.4g} within one epoch"
    )
    raise TrainingDivergedError(
        f"{owner or 'Training'} diverged during {phase}: {what} "
        f"(learning_rate={learning_rate}). Use a smaller learning rate, scale the "
        "data, or dtype='float64'."
    )


def smoothed_converged(objectives, tol, window=3):
    """Convergence test of gradient-trained fits (noisy epoch objectives).

    True when the mean objective of the last ``window`` epochs improved on
    the mean of the ``window`` epochs before by less than ``tol`` relative
    to its magnitude: ``(m_new - m_old) < tol * max(|m_old|, 1)``. A run whose
    objective falls (noise, or a learning rate too large to descend further)
    counts as converged too.

    Parameters
    ----------
    objectives : list of float
        The objective (higher is better) after each epoch.
    tol : float
    window : int, default=3

    Returns
    -------
    converged : bool
    """
    if len(objectives) < 2 * window:
        return False
    new = sum(objectives[-window:]) / window
    old = sum(objectives[-2 * window : -window]) / window
    return new - old < tol * max(abs(old), 1.0)
