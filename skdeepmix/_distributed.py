"""torch.distributed helpers: one model trained by several processes.

When :mod:`torch.distributed` is initialised (for instance by ``torchrun``) with
more than one process, ``fit`` on each process's shard of the rows trains one
shared model. Two modes exist, chosen by an estimator's class attribute
``_distributed_mode`` (see :class:`~skdeepmix._base.BaseDeepMixture`):

``'exact'`` (EM estimators, e.g. ``GaussianMixture``)
    The hooks all-reduce their sufficient statistics and log-likelihoods, and
    every random draw is made from the shared generator with *global* row
    indices (the process that owns a drawn row sends it to the others), so the
    result equals a single-process fit on the concatenated shards (rank 0's
    rows first, then rank 1's, ...), up to the order of floating-point sums.
``'gradients'`` (gradient-trained estimators)
    The state after ``_initialize`` is broadcast from rank 0,
    :func:`~skdeepmix._train.train_epoch` / :func:`~skdeepmix._train.train_step`
    average the gradients over the processes (``DistributedDataParallel``
    semantics) and the objective is averaged, so every rank holds the same
    parameters after each step.

Everything here is a no-op for a single process: :class:`RowPartition` then
describes all the rows and its reductions return their input.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib

import torch


def _import_torch_functional_collectives():
    """Import :mod:`torch.distributed.nn.functional` now, with skdeepmix.

    That torch module binds the default process group *as it is at import
    time* as the default argument of its functions, and ``torch._dynamo``
    imports it the first time an optimizer is built. Imported after
    ``init_process_group`` (at the first fit of a gradient-trained
    estimator), it keeps the group alive after ``destroy_process_group()``:
    gloo's worker threads then outlive it, and one releasing a tensor while
    Python shuts down aborts the process ("terminate called without an
    active exception", SIGABRT at exit). Imported here, before a script
    initialises the group (``import skdeepmix`` at the top), it binds
    ``None`` and ``destroy_process_group()`` frees the group. About 2 ms.
    """
    if torch.distributed.is_available():
        importlib.import_module("torch.distributed.nn.functional")


_import_torch_functional_collectives()

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "is_main_process",
    "RowPartition",
    "local_fit",
    "gradient_sync_enabled",
    "sync_gradients",
    "broadcast_object",
    "all_gather_object",
]

_DISABLED = contextvars.ContextVar("skdeepmix_distributed_disabled", default=False)
_GRADIENT_SYNC = contextvars.ContextVar("skdeepmix_gradient_sync", default=False)


def is_distributed():
    """Whether torch.distributed is initialised with more than one process
    (and not switched off by :func:`local_fit`)."""
    if _DISABLED.get():
        return False
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def world_size():
    """Number of processes taking part in a fit (1 when not distributed)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank():
    """Rank of this process (0 when not distributed)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process():
    """True on rank 0 (and when not distributed): the process that prints."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


@contextlib.contextmanager
def local_fit():
    """Context manager: fit on this process's data only, even under torchrun.

    Examples
    --------
    >>> from skdeepmix._distributed import local_fit
    >>> with local_fit():  # doctest: +SKIP
    ...     model.fit(X_local)  # an independent model per process
    """
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


@contextlib.contextmanager
def gradient_sync(enabled=True):
    """Switch gradient averaging in :func:`~skdeepmix._train.train_step` on
    (set by the base class around ``fit`` of a ``'gradients'`` estimator)."""
    token = _GRADIENT_SYNC.set(bool(enabled) and is_distributed())
    try:
        yield
    finally:
        _GRADIENT_SYNC.reset(token)


def gradient_sync_enabled():
    """Whether gradients are currently averaged over the processes."""
    return _GRADIENT_SYNC.get() and is_distributed()


def _backend_device(device):
    """Device on which collectives run for tensors living on ``device``."""
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor, op="sum"):
    """All-reduce ``tensor`` in place (through the backend's device)."""
    if not is_distributed():
        return tensor
    dist = torch.distributed
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    comm_device = _backend_device(tensor.device)
    if tensor.device == comm_device:
        dist.all_reduce(tensor, op=reduce_op)
        return tensor
    moved = tensor.to(comm_device)
    dist.all_reduce(moved, op=reduce_op)
    tensor.copy_(moved)
    return tensor


def all_reduce_scalar(value, op="sum"):
    """All-reduce a Python number (float64) and return it."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    return float(all_reduce(tensor, op)[0])


def broadcast_object(obj, src=0):
    """Return rank ``src``'s ``obj`` on every rank (tensors are moved back to
    the device they had on the receiving rank's side, when it has them)."""
    if not is_distributed():
        return obj
    objects = [_to_cpu(obj) if rank() == src else None]
    torch.distributed.broadcast_object_list(objects, src=src)
    return _like(objects[0], obj)


def all_gather_object(obj):
    """The list of every rank's ``obj`` (``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    objects = [None] * world_size()
    torch.distributed.all_gather_object(objects, _to_cpu(obj))
    return objects


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return type(value)((k, _to_cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _like(value, template):
    """``value`` with its tensors on the devices of ``template``'s tensors."""
    if isinstance(value, torch.Tensor) and isinstance(template, torch.Tensor):
        return value.to(template.device)
    if isinstance(value, dict) and isinstance(template, dict):
        return type(value)((k, _like(v, template.get(k))) for k, v in value.items())
    if isinstance(value, (list, tuple)) and isinstance(template, (list, tuple)):
        if len(value) == len(template):
            return type(value)(_like(v, t) for v, t in zip(value, template))
    return value


def sync_gradients(parameters, extra=None):
    """Average the gradients of ``parameters`` over the processes (DDP semantics).

    Parameters
    ----------
    parameters : iterable of Tensor
        The same parameters, in the same order, on every process. A missing
        gradient counts as zeros (so that every process joins the reduction).
    extra : Tensor of shape (m,), optional
        Values summed (not averaged) over the processes in the same reduction,
        e.g. ``[loss * batch_size, batch_size]``.

    Returns
    -------
    extra_sum : Tensor of shape (m,) or None
    """
    parameters = [p for p in parameters if p.requires_grad]
    if not is_distributed():
        return extra
    grads = [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters
    ]
    pieces = [g.reshape(-1) for g in grads]
    n_extra = 0
    if extra is not None:
        n_extra = extra.numel()
        reference = pieces[0] if pieces else extra
        pieces.append(extra.to(device=reference.device, dtype=reference.dtype))
    if not pieces:
        return extra
    flat = torch.cat(pieces)
    all_reduce(flat)
    size = world_size()
    offset = 0
    for p, g in zip(parameters, grads):
        n = g.numel()
        averaged = flat[offset : offset + n].view_as(g) / size
        if p.grad is None:
            p.grad = averaged.clone()
        else:
            p.grad.copy_(averaged)
        offset += n
    if extra is None:
        return None
    return flat[offset : offset + n_extra].to(extra.dtype)


class RowPartition:
    """Where this process's rows sit among all processes' rows.

    The global data set is the concatenation of the shards in rank order.
    Without torch.distributed (or in :func:`local_fit`) it is all the rows.

    Parameters
    ----------
    n_local : int
        Number of rows of this process.
    n_features : int, optional
        Checked to be the same on every process.
    error : Exception, optional
        This process's input failed validation: every process raises (this
        one its own error), instead of the others waiting forever in the
        first collective.

    Attributes
    ----------
    offset : int
        Global index of this process's first row.
    n_total : int
        Number of rows over all processes.
    active : bool
        Whether reductions go over several processes.
    """

    def __init__(self, n_local, n_features=None, error=None):
        self.n_local = int(n_local)
        self.active = is_distributed()
        if not self.active and error is not None:
            raise error
        if self.active:
            size = world_size()
            info = torch.zeros(size + 3, dtype=torch.float64)
            info[rank()] = self.n_local
            features = -1.0 if n_features is None else float(n_features)
            info[size], info[size + 1] = features, -features
            info[size + 2] = 0.0 if error is None else 1.0
            all_reduce(info, "max")
            if error is not None:
                raise error
            if info[size + 2] > 0:
                raise ValueError(
                    "The input of another process failed validation (see its error); "
                    "every process stops."
                )
            if n_features is not None and info[size] != -info[size + 1]:
                raise ValueError(
                    "The processes' shards have different numbers of features "
                    f"({int(-info[size + 1])} to {int(info[size])})."
                )
            sizes = info[:size].long().tolist()
            self.sizes = sizes
            self.offset = int(sum(sizes[: rank()]))
            self.n_total = int(sum(sizes))
        else:
            self.sizes = [self.n_local]
            self.offset = 0
            self.n_total = self.n_local

    def sum(self, *tensors):
        """All-reduce (sum) tensors in place; one collective for all of them."""
        if not self.active or not tensors:
            return tensors if len(tensors) != 1 else tensors[0]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return tensors if len(tensors) != 1 else tensors[0]

    def sum_scalar(self, value):
        return all_reduce_scalar(value) if self.active else value

    def all_true(self, flag):
        """Whether ``flag`` holds on every process."""
        if not self.active:
            return bool(flag)
        return all_reduce_scalar(1.0 if flag else 0.0, "min") > 0.5

    def local(self, global_indices):
        """Mask of the global indices owned here, and their local positions."""
        inside = (global_indices >= self.offset) & (global_indices < self.offset + self.n_local)
        return inside, global_indices - self.offset

    def rows(self, X, global_indices):
        """Rows ``X_global[global_indices]`` on every process.

        Each process fills the rows it owns and one sum-reduction gives all of
        them to everyone (adding zeros is exact).
        """
        global_indices = torch.as_tensor(global_indices, device=X.device).reshape(-1)
        if not self.active:
            return X[global_indices]
        inside, local = self.local(global_indices)
        out = torch.zeros(global_indices.numel(), X.shape[1], dtype=X.dtype, device=X.device)
        positions = torch.nonzero(inside).flatten()
        if positions.numel():
            out[positions] = X[local[positions]]
        return all_reduce(out)

    def topk(self, values, k):
        """Global indices of the ``k`` largest of the values spread over the processes."""
        top = torch.topk(values, min(k, values.numel()))
        if not self.active:
            return top.indices
        count = min(k, values.numel())
        cand_values = torch.zeros((world_size(), k), dtype=values.dtype)
        cand_index = torch.zeros((world_size(), k), dtype=torch.float64)
        cand_values[rank()] = -torch.inf
        cand_values[rank(), :count] = top.values.cpu()
        cand_index[rank(), :count] = (top.indices + self.offset).cpu().double()
        all_reduce(cand_values)
        all_reduce(cand_index)
        best = torch.topk(cand_values.reshape(-1), k).indices
        return cand_index.reshape(-1)[best].long().to(values.device)


def searchsorted_global(partition, local_cumsum, targets):
    """Global indices of ``targets`` in the concatenated cumulative sums.

    ``local_cumsum`` is this process's cumulative sum (without the totals of
    the lower ranks); the targets lie in ``[0, global total)``.
    """
    if not partition.active:
        index = torch.searchsorted(local_cumsum, targets, right=True)
        return index.clamp_(max=local_cumsum.numel() - 1)
    totals = torch.zeros(world_size(), dtype=torch.float64)
    totals[rank()] = float(local_cumsum[-1]) if local_cumsum.numel() else 0.0
    all_reduce(totals)
    bounds = torch.cumsum(totals, 0).tolist()  # the same numbers on every rank
    low = 0.0 if rank() == 0 else bounds[rank() - 1]
    high = bounds[rank()]
    last_owner = max(r for r, s in enumerate(partition.sizes) if s > 0)
    targets = targets.to(torch.float64)
    mine = (targets >= low) & (targets < high)
    if rank() == last_owner:  # rounding: a target at or past the end belongs here
        mine |= targets >= bounds[-1]
    shifted = targets - low
    result = torch.zeros(targets.numel(), dtype=torch.float64)
    if bool(mine.any()) and local_cumsum.numel():
        values = shifted[mine].to(local_cumsum.dtype)
        index = torch.searchsorted(local_cumsum, values, right=True)
        index = index.clamp_(max=local_cumsum.numel() - 1) + partition.offset
        result[mine.cpu()] = index.double().cpu()
    all_reduce(result)
    return result.long().to(targets.device)
