"""Device, dtype, random-state and array conversion helpers (the one place for them)."""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import torch
from sklearn.utils import check_random_state

__all__ = [
    "MEMORY_BUDGET",
    "build_module",
    "init_layers_",
    "chunk_rows",
    "limit_threads",
    "run_in_threads",
    "row_threads",
    "threads_for_rows",
    "thread_shares",
    "idle_cpus",
    "resolve_device",
    "resolve_dtype",
    "make_generator",
    "to_tensor",
    "to_numpy",
    "iter_row_chunks",
    "is_out_of_core",
    "RowSource",
]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
}


def resolve_device(device, *, fallback_to_cpu=False):
    """Turn a user ``device`` argument into a :class:`torch.device`.

    Parameters
    ----------
    device : {'auto', 'cpu', 'cuda', 'cuda:N', 'mps'} or torch.device
        ``'auto'`` picks CUDA when it is available, else the CPU.
    fallback_to_cpu : bool, default=False
        When the requested accelerator is not available, use the CPU instead of
        raising (used at predict time, so that a model fitted on a GPU and
        unpickled on a CPU-only machine still works).

    Returns
    -------
    device : torch.device

    Raises
    ------
    ValueError
        For an unknown or unsupported device, or one this machine lacks.
    TypeError
        If ``device`` is neither a string nor a torch.device.
    """
    supported = "use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
    if isinstance(device, str):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            resolved = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"Invalid device {device!r}: {supported}.") from exc
    elif isinstance(device, torch.device):
        resolved = device
    else:
        raise TypeError(
            f"device must be a string or a torch.device, got {type(device).__name__}."
        )
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        available = (resolved.index or 0) < n_gpus
        what = f"this machine has {n_gpus} CUDA device(s) available to torch"
    elif resolved.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        available = bool(backend is not None and backend.is_available())
        what = "torch's MPS backend is not available on this machine"
    else:
        raise ValueError(f"Unsupported device {str(device)!r}: {supported}.")
    if available:
        # With its index, so that it equals the device of the tensors made on it.
        if resolved.index is None:
            index = torch.cuda.current_device() if resolved.type == "cuda" else 0
            resolved = torch.device(resolved.type, index)
        return resolved
    if fallback_to_cpu:
        return torch.device("cpu")
    raise ValueError(
        f"device={str(device)!r} was requested but {what}; use device='cpu' or "
        "device='auto'."
    )


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


def build_module(factory, generator, device, dtype):
    """Build a torch module whose random initial values come from ``generator``.

    ``factory()`` runs on torch's ``meta`` device, so that constructing the
    layers draws nothing from (and changes nothing in) torch's global random
    generators; the module is then materialised on ``device`` with ``dtype``
    and initialised by its ``reset_parameters(generator)`` method, which must
    set *every* parameter and buffer (see :func:`init_layers_`).

    Parameters
    ----------
    factory : callable
        Returns the module (e.g. ``lambda: GMVAE(784, 10, 20)``).
    generator : torch.Generator
    device : torch.device
    dtype : torch.dtype

    Returns
    -------
    module : torch.nn.Module
    """
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device).to(dtype)
    with torch.no_grad():
        module.reset_parameters(generator)
    return module


_DEFAULT_INIT_LAYERS = (
    torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
)


def init_layers_(module, generator):
    """torch's default initialisation of the linear and convolution layers of
    ``module`` (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weights and biases,
    which is what ``kaiming_uniform_(a=sqrt(5))`` gives), drawn from
    ``generator``. Returns ``module``."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, _DEFAULT_INIT_LAYERS):
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=generator)
    return module


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


#: Values (not bytes) one chunk's largest temporary may hold: 2**20 values are
#: 4 MiB in float32 and 8 MiB in float64, large enough for efficient matrix
#: products and small enough to stay in the CPU's caches.
MEMORY_BUDGET = 2**20

#: The same on an accelerator (CUDA, MPS), where a chunk's cost is dominated by
#: the launch of its dozens of kernels unless it is large: 2**25 values are
#: 128 MiB in float32.
ACCELERATOR_BUDGET = 2**25


def chunk_rows(work_per_row, chunk_size=None, *, device=None, budget=None, min_rows=64,
               max_rows=None):
    """Rows to process at once: ``chunk_size``, or what fits the memory budget.

    The one rule by which every estimator bounds its temporaries.

    Parameters
    ----------
    work_per_row : int
        Temporary values one row needs (e.g. ``n_components * n_features``).
    chunk_size : int or None, default=None
        A user's explicit choice, returned as it is.
    device : torch.device or None, default=None
        Where the chunks are processed; sets the default budget and row bound
        (CPU or None: cache-sized chunks, at most 2**16 rows; an accelerator:
        :data:`ACCELERATOR_BUDGET`, at most 2**22 rows).
    budget : int or None, default=None
        Values the largest temporary may hold (default: by ``device``).
    min_rows : int, default=64
    max_rows : int or None, default=None
        Bounds of the automatic choice (``max_rows`` default: by ``device``).

    Returns
    -------
    rows : int
    """
    if chunk_size is not None:
        return int(chunk_size)
    accelerator = device is not None and torch.device(device).type != "cpu"
    if budget is None:
        budget = ACCELERATOR_BUDGET if accelerator else MEMORY_BUDGET
    if max_rows is None:
        max_rows = 2**22 if accelerator else 2**16
    return int(min(max(budget // max(int(work_per_row), 1), min_rows), max_rows))


def _running_tasks():
    """Tasks running or ready to run on the whole machine now (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    raise ValueError("no procs_running in /proc/stat")


def _own_running_threads():
    """This process's threads that are running or ready to run now."""
    import os

    running = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                running += stat.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):  # the thread ended meanwhile
            continue
    return running


def idle_cpus(interval=0.02, samples=8):
    """Number of this process's CPUs that no other process uses now (at least one).

    ``samples`` snapshots over ``interval`` seconds of the machine's running
    tasks (``procs_running`` of ``/proc/stat``) minus this process's own
    running threads: the average is the number of competitors, subtracted from
    the CPUs the process may run on. Instantaneous counts, not the CPU-time
    counters (whose 10 ms ticks made a 20 ms measurement flip between one and
    two idle CPUs, and with it a fit's thread count and speed); own threads
    (a BLAS pool still spinning after a NumPy call) are not competitors. Where
    ``/proc`` is not available, the number of usable CPUs.
    """
    import os
    import time

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)
    competitors = 0
    try:
        for sample in range(samples):
            if sample:
                time.sleep(interval / samples)
            competitors += max(_running_tasks() - _own_running_threads(), 0)
    except (OSError, ValueError):  # pragma: no cover - no /proc
        return max(cpus, 1)
    return max(int(cpus - competitors / samples + 0.25), 1)


class limit_threads:
    """Context manager: at most ``n_threads`` torch CPU threads, restored on exit.

    Whatever it sets, it sets for the duration of the ``with`` block only
    (threadpoolctl-style); ``None`` changes nothing.
    """

    def __init__(self, n_threads):
        self.n_threads = n_threads
        self.previous = None

    def __enter__(self):
        current = torch.get_num_threads()
        if self.n_threads is not None and int(self.n_threads) < current:
            self.previous = current
            torch.set_num_threads(max(int(self.n_threads), 1))
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            torch.set_num_threads(self.previous)
            self.previous = None
        return False


_LOCAL = threading.local()


class row_threads:
    """Context manager: torch on one thread, ``n_threads`` CPU threads for
    independent row chunks (:func:`threads_for_rows`, :func:`run_in_threads`).

    For work made of independent row chunks (an EM pass, a prediction), one
    torch thread per chunk on ``n_threads`` threads is faster and steadier
    than torch's OpenMP pool: the pool's threads spin for milliseconds after
    each parallel operation, taking the core a helper thread needs, and wait
    at a barrier after each of a chunk's small operations. torch's (global)
    thread count is 1 until the last such block ends, then restored;
    ``None`` changes nothing (a GPU).
    """

    def __init__(self, n_threads):
        self.n_threads = n_threads

    def __enter__(self):
        self.previous = getattr(_LOCAL, "row_threads", 1)
        if self.n_threads is not None:
            _one_torch_thread(True)
            _LOCAL.row_threads = max(int(self.n_threads), 1)
        return self

    def __exit__(self, *exc):
        if self.n_threads is not None:
            _LOCAL.row_threads = self.previous
            _one_torch_thread(False)
        return False


def threads_for_rows():
    """The threads a :class:`row_threads` block of this thread gives to row
    chunks (1 outside one)."""
    return getattr(_LOCAL, "row_threads", 1)


def thread_shares(chunks, X):
    """The row ``chunks`` of ``X`` split into contiguous runs, one per thread
    that a :class:`row_threads` block gives (:func:`threads_for_rows`), when
    the rows are in memory on the CPU (a numpy array or a CPU tensor); one run
    otherwise (rows streamed from a file, a GPU, one thread)."""
    n_threads = min(threads_for_rows(), len(chunks))
    in_memory = isinstance(X, np.ndarray) or (
        isinstance(X, torch.Tensor) and X.device.type == "cpu")
    if n_threads <= 1 or not in_memory:
        return [chunks]
    bounds = [round(i * len(chunks) / n_threads) for i in range(n_threads + 1)]
    return [chunks[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]


class _Worker:
    """A helper thread that runs the tasks put in its queue, one at a time."""

    def __init__(self, name):
        import queue

        self._tasks = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self):
        while True:
            future, task = self._tasks.get()
            try:
                future.set_result(task())
            except BaseException as error:  # handed to the caller
                future.set_exception(error)

    def submit(self, task):
        from concurrent.futures import Future

        future = Future()
        self._tasks.put((future, task))
        return future


_WORKERS = {}  # process id -> helper threads (a forked child starts its own)


def _workers(n_workers):
    """``n_workers`` helper threads of this process, started once and reused."""
    import os

    workers = _WORKERS.setdefault(os.getpid(), [])
    while len(workers) < n_workers:
        workers.append(_Worker(f"skdeepmix-{len(workers) + 1}"))
    return workers[:n_workers]


def run_in_threads(tasks):
    """Run the callables ``tasks`` at once, each on its own thread with one
    torch thread; return their results in order.

    Independent pieces of CPU work (e.g. the row chunks of an EM pass, each
    summed on its own) run faster this way than one after the other on a
    shared torch thread pool: no barrier between the small operations, and
    each thread keeps its rows in its own cache. The calling thread runs the
    first task, helper threads (started once per process, idle in between)
    the others. torch's thread count is 1 for the duration (the setting is
    global) and restored afterwards, also when a task raises (the first
    exception is raised after all the tasks ended).

    Parameters
    ----------
    tasks : list of callable
        Called without arguments.

    Returns
    -------
    results : list
    """
    from concurrent.futures import wait

    if len(tasks) <= 1:
        return [task() for task in tasks]
    _one_torch_thread(True)
    futures = []
    try:
        futures = [worker.submit(task)
                   for worker, task in zip(_workers(len(tasks) - 1), tasks[1:])]
        first = tasks[0]()
    finally:
        wait(futures)
        _one_torch_thread(False)
    return [first] + [future.result() for future in futures]


_ONE_THREAD = {"depth": 0, "previous": None}
_ONE_THREAD_LOCK = threading.Lock()


def _one_torch_thread(enter):
    """Set torch's (global) thread count to 1 on the first ``enter``, and
    restore it when the last caller leaves (calls from several user threads
    at once must not leave it at 1)."""
    with _ONE_THREAD_LOCK:
        if enter:
            if _ONE_THREAD["depth"] == 0:
                _ONE_THREAD["previous"] = torch.get_num_threads()
                torch.set_num_threads(1)
            _ONE_THREAD["depth"] += 1
        else:
            _ONE_THREAD["depth"] -= 1
            if _ONE_THREAD["depth"] == 0:
                torch.set_num_threads(_ONE_THREAD["previous"])


def iter_row_chunks(n_rows, chunk_size):
    """Yield ``slice`` objects covering ``range(n_rows)`` in chunks."""
    chunk_size = max(int(chunk_size), 1)
    for start in range(0, n_rows, chunk_size):
        yield slice(start, min(start + chunk_size, n_rows))


# ------------------------------------------------------------ out-of-core rows
def is_out_of_core(X):
    """Whether ``X`` should be streamed in row chunks rather than loaded whole.

    True for numpy memory maps (``np.memmap``, ``np.load(..., mmap_mode='r')``)
    and for other 2-D array-likes with ``shape``, ``dtype`` and row slicing
    that are not in-memory arrays (e.g. ``h5py`` or ``zarr`` arrays); False for
    numpy arrays, tensors, lists, data frames and sparse matrices.
    """
    if isinstance(X, np.memmap):
        return True
    if isinstance(X, (np.ndarray, torch.Tensor, list, tuple)):
        return False
    try:
        import scipy.sparse as sp

        if sp.issparse(X):
            return False
    except ImportError:  # pragma: no cover
        pass
    if hasattr(X, "iloc") or hasattr(X, "__dataframe__"):
        return False
    shape = getattr(X, "shape", None)
    return (
        shape is not None
        and len(shape) == 2
        and hasattr(X, "dtype")
        and hasattr(X, "__getitem__")
    )


def _memmap_of(array):
    """The ``mmap.mmap`` behind a numpy array (None when it is not mapped or
    when it is a private copy-on-write mapping)."""
    import mmap

    node = array
    while node is not None:
        mm = getattr(node, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            return None if getattr(node, "mode", "r") == "c" else mm
        if isinstance(node, mmap.mmap):
            return node
        node = getattr(node, "base", None)
    return None


class _PageReleaser:
    """Drop the resident pages of a shared memory map after a chunk was read.

    Pages of a file mapping count in the process's resident memory until the
    kernel reclaims them; streaming a file larger than memory through
    ``np.memmap`` would then show up as that much RSS (and push other
    processes out). ``madvise(MADV_DONTNEED)`` on a *shared* file mapping only
    unmaps them (the data stay in the file and the page cache, a later read
    faults them in again), so it is safe at any time. Best effort: a no-op
    where the platform or the array does not allow it.
    """

    def __init__(self, source):
        self.mmap = None
        try:
            import mmap

            if isinstance(source, np.ndarray) and hasattr(mmap, "MADV_DONTNEED"):
                self.mmap = _memmap_of(source)
                if self.mmap is not None:
                    self.base = np.frombuffer(self.mmap, dtype=np.uint8).ctypes.data
                    self.length = len(self.mmap)
                    self.page = mmap.PAGESIZE
                    self.advice = mmap.MADV_DONTNEED
        except (TypeError, ValueError, AttributeError, OSError):
            self.mmap = None

    def __call__(self, chunk):
        if self.mmap is None or not isinstance(chunk, np.ndarray) or chunk.size == 0:
            return
        if not (chunk.flags.c_contiguous or chunk.flags.f_contiguous):
            return
        start = chunk.ctypes.data - self.base
        end = start + chunk.nbytes
        if start < 0 or end > self.length:
            return
        start -= start % self.page
        try:
            self.mmap.madvise(self.advice, start, min(end, self.length) - start)
        except (OSError, ValueError):  # pragma: no cover - best effort
            self.mmap = None


class RowSource:
    """Rows of a large array-like, read and converted to tensors chunk by chunk.

    Stands in for the data tensor in the training hooks of estimators that
    stream (``_supports_out_of_core``): ``X.shape``, ``X.device``,
    ``X.dtype``, ``X[slice]`` and ``X[index_tensor]`` behave as on a tensor,
    but only the requested rows are read (and copied) from ``source``. Pages
    of a memory-mapped source are released after each read, so that resident
    memory stays bounded by the chunk size.

    Parameters
    ----------
    source : array-like of shape (n_samples, n_features)
        A ``np.memmap`` or any array-like with ``shape`` and row slicing.
    device : torch.device
    dtype : torch.dtype
    """

    def __init__(self, source, device, dtype):
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.shape = torch.Size(tuple(int(s) for s in source.shape))
        self.ndim = len(self.shape)
        self._release = _PageReleaser(source)

    def __len__(self):
        return self.shape[0]

    def _read(self, index):
        chunk = self.source[index]
        array = np.asarray(chunk)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            tensor = torch.as_tensor(array)
        if tensor.device == self.device and tensor.dtype == self.dtype:
            tensor = tensor.clone()  # detach from the mapped pages
        else:
            tensor = tensor.to(device=self.device, dtype=self.dtype)
        self._release(array)
        return tensor

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._read(index)
        if isinstance(index, int):
            return self._read(slice(index, index + 1))[0]
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size == 0:
            return torch.empty(0, *self.shape[1:], device=self.device, dtype=self.dtype)
        # sorted unique reads (h5py needs them; memmaps read less)
        unique, inverse = np.unique(index, return_inverse=True)
        rows = torch.stack([self._read(slice(int(i), int(i) + 1))[0] for i in unique]) \
            if unique.size <= 64 else self._read(unique)
        return rows[torch.as_tensor(inverse, device=self.device)]

    def to(self, device=None, dtype=None):
        """A RowSource of the same rows on another device/dtype."""
        return RowSource(self.source, device or self.device, dtype or self.dtype)

    def __repr__(self):
        return (
            f"RowSource({type(self.source).__name__}, shape={tuple(self.shape)}, "
            f"device={self.device}, dtype={self.dtype})"
        )
