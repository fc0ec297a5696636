"""Continuously parameterized mixtures (CPMM, Bender et al., ICML 2023) as torch modules.

A neural ODE evolves the joint state ``h(t) = [mu(t), vec A(t), log d(t),
(log pi(t)), alpha(t)]`` of a mixture of factor analysers along a pseudotime
``t in [0, 1]``. ``C`` learnable initial states (one per cluster) share one ODE
(or have one each); the components of cluster ``c`` are the MFA parameters read
off the state at ``G`` pseudotimes, giving the hierarchical mixture

    p(x) = sum_c eta_c sum_j pi_c(t_j) N(x; mu_c(t_j), A_c(t_j) A_c(t_j)^T + D_c(t_j)).

State layout (per trajectory, flattened): ``[mu (D), A (R blocks of D),
raw log d (D), log-weight slot (1 for vectors, H*W for images; only when the
weights are in the state), alpha (augmentation)]``, every block of ``D`` values
in the order of the data's features. For images (features in row-major
``(H, W, C)`` order, channels last) the CNN ODE function views the same vector
as ``(n_channels, H, W)`` channels. ``log d`` is soft-clipped from below:
``log d = m + softplus(raw - m)``, ``m = log(min_variance)``.

Also here: the data transforms of the estimator (dequantisation, the logit
transform with its log-Jacobian) and the hierarchical MFA density.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchdiffeq import odeint, odeint_adjoint

from .._gaussian import mfa_log_prob_unchecked
from .._torch_utils import init_layers_

__all__ = [
    "LOGIT_ALPHA",
    "logit_transform",
    "logit_inverse",
    "dequantize",
    "ODEFuncMLP",
    "ODEFuncCNN",
    "CPMMNet",
    "FIXED_STEP_METHODS",
    "ADAPTIVE_METHODS",
    "EXPLICIT_STEPPERS",
    "fixed_grid_solve",
    "solve_ode",
    "mixture_log_prob",
]

FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")

#: ``alpha`` of the logit transform (FFJORD / CPMM convention)
LOGIT_ALPHA = 1e-6


# ------------------------------------------------------------------ transforms
def logit_transform(X, alpha=LOGIT_ALPHA):
    """``y = logit(alpha + (1 - 2 alpha) x)`` and its log-Jacobian.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
        Values in ``[0, 1]``.
    alpha : float, default=1e-6

    Returns
    -------
    Y : Tensor of shape (n_samples, n_features)
    log_jacobian : Tensor of shape (n_samples,)
        ``sum_i [log(1 - 2 alpha) - log s_i - log(1 - s_i)]``, so that
        ``log p_X(x) = log p_Y(y) + log_jacobian``.
    """
    s = alpha + (1 - 2 * alpha) * X
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    return log_s - log_1ms, (math.log(1 - 2 * alpha) - log_s - log_1ms).sum(1)


def logit_inverse(Y, alpha=LOGIT_ALPHA):
    """Inverse of :func:`logit_transform` (clipped to ``[0, 1]``)."""
    return ((torch.sigmoid(Y) - alpha) / (1 - 2 * alpha)).clamp(0.0, 1.0)


def dequantize(X, generator, levels=256):
    """``((levels - 1) x + u) / levels`` with ``u ~ U[0, 1)``, for ``x`` in ``[0, 1]``."""
    noise = torch.rand(X.shape, dtype=X.dtype, device=X.device, generator=generator)
    return ((levels - 1) * X + noise) / levels


# ------------------------------------------------------------------ ODE functions
class _Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


def make_activation(name):
    """``'sin'``, ``'tanh'`` or ``'softplus'`` as a module."""
    if name == "sin":
        return _Sin()
    if name == "tanh":
        return nn.Tanh()
    if name == "softplus":
        return nn.Softplus()
    raise ValueError(f"Unknown activation {name!r}; use 'sin', 'tanh' or 'softplus'.")


def _time_column(t, h):
    """The pseudotime as a column ``(B, 1)``: ``t`` is a scalar or one time per row."""
    return t.to(h).reshape(-1, 1).expand(h.shape[0], 1)


class ODEFuncMLP(nn.Module):
    """Non-autonomous ODE function ``f(h, t)``: an MLP on ``[h, t]``.

    Parameters
    ----------
    state_dim : int
    hidden : int
        Width of the hidden layers.
    depth : int
        Number of linear layers (>= 2).
    activation : {'sin', 'tanh', 'softplus'}
    out_scale : float
        The last layer's initial weights are multiplied by this (small
        dynamics at the start of training).
    """

    def __init__(self, state_dim, hidden=128, depth=3, activation="sin", out_scale=0.1):
        super().__init__()
        dims = [state_dim + 1] + [hidden] * (depth - 1) + [state_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = make_activation(activation)
        self.out_scale = float(out_scale)

    def reset_parameters(self, generator):
        init_layers_(self, generator)
        self.layers[-1].weight.mul_(self.out_scale)
        self.layers[-1].bias.zero_()

    def forward(self, t, h):
        """``dh/dt`` of shape (B, state_dim); ``t`` is a scalar or of shape (B,)."""
        out = torch.cat([h, _time_column(t, h)], dim=1)
        for layer in self.layers[:-1]:
            out = self.act(layer(out))
        return self.layers[-1](out)


class ODEFuncCNN(nn.Module):
    """Non-autonomous ODE function on image-shaped state: a small CNN.

    The state vector of a trajectory holds ``n_blocks`` blocks of ``H*W*C``
    values in the data's feature order (row-major ``(H, W, C)``, channels
    last: the mean, the ``R`` loadings, ``log d``), then ``n_extra`` planes of
    ``H*W`` values (weight slot, augmentation). The CNN sees them as
    ``n_blocks*C + n_extra`` channels plus a constant pseudotime channel;
    ``depth`` 3x3 convolutions with ``activation`` in between.

    Parameters
    ----------
    image_shape : tuple (H, W, C)
    n_blocks : int
    n_extra : int
    hidden : int
    depth : int
    activation : {'sin', 'tanh', 'softplus'}
    out_scale : float
    """

    def __init__(self, image_shape, n_blocks, n_extra, hidden=64, depth=3, activation="sin",
                 out_scale=0.1):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.n_blocks, self.n_extra = int(n_blocks), int(n_extra)
        n_channels = self.n_blocks * self.image_shape[2] + self.n_extra
        dims = [n_channels + 1] + [hidden] * (depth - 1) + [n_channels]
        self.layers = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(dims[:-1], dims[1:])
        )
        self.act = make_activation(activation)
        self.out_scale = float(out_scale)

    reset_parameters = ODEFuncMLP.reset_parameters

    def _to_channels(self, h, *planes):
        """``(B, n_channels + len(planes), H, W)`` in channels-last memory (faster
        convolutions on the CPU); ``planes`` are extra ``(B, 1, H, W)`` channels."""
        H, W, C = self.image_shape
        B, k = h.shape[0], self.n_blocks * H * W * C
        blocks = h[:, :k].reshape(B, self.n_blocks, H, W, C)
        if C > 1:
            blocks = blocks.permute(0, 1, 4, 2, 3)
        blocks = blocks.reshape(B, self.n_blocks * C, H, W)
        out = torch.cat([blocks, h[:, k:].reshape(B, self.n_extra, H, W), *planes], dim=1)
        return out.contiguous(memory_format=torch.channels_last)

    def _from_channels(self, out):
        H, W, C = self.image_shape
        B = out.shape[0]
        blocks = out[:, : self.n_blocks * C].reshape(B, self.n_blocks, C, H, W)
        if C > 1:
            blocks = blocks.permute(0, 1, 3, 4, 2)
        return torch.cat([blocks.reshape(B, -1), out[:, self.n_blocks * C :].reshape(B, -1)],
                         dim=1)

    def forward(self, t, h):
        """``dh/dt`` of shape (B, state_dim); ``t`` is a scalar or of shape (B,)."""
        H, W, _ = self.image_shape
        tt = _time_column(t, h).reshape(-1, 1, 1, 1).expand(h.shape[0], 1, H, W)
        out = self._to_channels(h, tt)
        for layer in self.layers[:-1]:
            out = self.act(layer(out))
        return self._from_channels(self.layers[-1](out))


class _PerClusterFunc(nn.Module):
    """One ODE function per trajectory (``shared_ode=False``).

    Rows ``r`` of the state belong to trajectory ``r % C`` (the state is
    ``(C, S)``, or ``(T*C, S)`` for the slopes of ``T`` times at once).
    """

    def __init__(self, funcs):
        super().__init__()
        self.funcs = nn.ModuleList(funcs)

    def reset_parameters(self, generator):
        for func in self.funcs:
            func.reset_parameters(generator)

    def forward(self, t, h):
        C = len(self.funcs)
        h = h.reshape(-1, C, h.shape[-1])
        t = t.reshape(-1, C) if t.dim() else t.expand(h.shape[0], C)
        out = [f(t[:, c], h[:, c]) for c, f in enumerate(self.funcs)]
        return torch.stack(out, dim=1).reshape(-1, h.shape[-1])


class _Checkpointed(nn.Module):
    """Gradient checkpointing around an ODE function (recompute in backward)."""

    def __init__(self, func):
        super().__init__()
        self.func = func

    def reset_parameters(self, generator):
        self.func.reset_parameters(generator)

    def forward(self, t, h):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.func, t, h, use_reentrant=False)
        return self.func(t, h)


def solve_ode(func, y0, times, *, method="rk4", step_size=0.1, rtol=1e-3, atol=1e-4,
              adjoint=False):
    """``torchdiffeq`` solve with the package's option conventions.

    Fixed-step methods use ``step_size`` (outputs between grid points are
    interpolated by the solver); adaptive ones ``rtol``/``atol``.
    """
    options = {"step_size": float(step_size)} if method in FIXED_STEP_METHODS else None
    kwargs = dict(method=method, rtol=rtol, atol=atol, options=options)
    if adjoint:
        return odeint_adjoint(func, y0, times, adjoint_params=tuple(func.parameters()),
                              **kwargs)
    return odeint(func, y0, times, **kwargs)


#: fixed-step methods solved by :func:`fixed_grid_solve` (torchdiffeq's formulas)
EXPLICIT_STEPPERS = ("euler", "midpoint", "rk4")


def fixed_grid_solve(func, y0, grid, method="rk4"):
    """Explicit fixed-step solve on ``grid``, keeping the slopes of the steps.

    The same steps as torchdiffeq's ``'euler'``, ``'midpoint'`` and ``'rk4'``
    (the 3/8 rule), but the first stage of every step, ``f(t_n, y_n)``, is
    returned as well, so that a cubic Hermite interpolation between the grid
    points needs only one more evaluation (at the last point).

    Parameters
    ----------
    func : callable ``f(t, y)``
    y0 : Tensor of shape (B, S)
    grid : Tensor of shape (n + 1,)
    method : {'euler', 'midpoint', 'rk4'}

    Returns
    -------
    states : Tensor of shape (n + 1, B, S)
        ``y`` at the grid points.
    slopes : list of n Tensors of shape (B, S)
        ``f(t_i, y_i)`` at the first ``n`` grid points.
    """
    states, slopes, y = [y0], [], y0
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        k1 = func(t0, y)
        if method == "euler":
            dy = dt * k1
        elif method == "midpoint":
            dy = dt * func(t0 + 0.5 * dt, y + 0.5 * dt * k1)
        else:
            k2 = func(t0 + dt / 3, y + dt * k1 / 3)
            k3 = func(t0 + dt * 2 / 3, y + dt * (k2 - k1 / 3))
            k4 = func(t1, y + dt * (k1 - k2 + k3))
            dy = (k1 + 3 * (k2 + k3) + k4) * dt * 0.125
        y = y + dy
        states.append(y)
        slopes.append(k1)
    return torch.stack(states), slopes


def _interpolation_weights(grid, times, interp):
    """Weights ``(T, n + 1)`` of the states and of the slopes at the grid points
    giving the linear or cubic Hermite interpolation at ``times`` (the slope
    weights are None for ``'linear'``)."""
    n_steps = grid.numel() - 1
    idx = torch.searchsorted(grid, times.detach(), right=True).clamp(1, n_steps)
    lo, hi = grid[idx - 1], grid[idx]
    w = ((times - lo) / (hi - lo)).clamp(0.0, 1.0)[:, None]
    left = F.one_hot(idx - 1, n_steps + 1).to(times.dtype)
    right = F.one_hot(idx, n_steps + 1).to(times.dtype)
    if interp == "linear":
        return left * (1 - w) + right * w, None
    w2, w3, dt = w * w, w * w * w, (hi - lo)[:, None]
    states = left * (2 * w3 - 3 * w2 + 1) + right * (3 * w2 - 2 * w3)
    return states, (left * (w3 - 2 * w2 + w) + right * (w3 - w2)) * dt


# ------------------------------------------------------------------ the model
class CPMMNet(nn.Module):
    """Hierarchical continuously parameterized mixture of factor analysers.

    Works on standardised data ``z = (y - shift) / scale`` (per-feature buffers set by
    the estimator from the training data).

    Parameters
    ----------
    n_features : int
        ``D``.
    n_clusters : int
        ``C``, number of trajectories.
    rank : int
        ``R``, rank of the factor loadings.
    augment_factor : float
        Size of the augmentation ``alpha`` relative to the unaugmented state.
    hidden : int
        Width of the ODE function.
    depth : int
        Layers of the ODE function.
    activation : {'sin', 'tanh', 'softplus'}
    image_shape : tuple (H, W, C) or None
        Use the CNN ODE function over image-shaped state.
    shared_ode : bool
        One ODE for all trajectories (paper default) or one per trajectory.
    weights_in_state : bool
        Put ``log pi`` in the state (else ``pi_c(t_j) = 1/G``).
    min_variance : float
        Soft floor of the noise variances ``d``, relative to the data's mean
        variance (see :meth:`set_standardization`).
    method, step_size, rtol, atol, adjoint, checkpoint :
        Solver settings (see :func:`solve_ode`).
    interp : {'cubic', 'linear'}
        Interpolation between the steps of fixed-step solvers (as torchdiffeq's
        ``interp`` option; cubic Hermite uses the ODE's slopes, C^1 trajectories).
    """

    def __init__(self, n_features, n_clusters, rank, *, augment_factor=2.0, hidden=128,
                 depth=3, activation="sin", image_shape=None, shared_ode=True,
                 weights_in_state=False, min_variance=1e-4, method="rk4",
                 step_size=0.25, rtol=1e-3, atol=1e-4, adjoint=False, checkpoint=False,
                 interp="cubic"):
        super().__init__()
        if interp not in ("cubic", "linear"):
            raise ValueError(f"interp must be 'cubic' or 'linear', got {interp!r}.")
        self.interp = interp
        D, R, C = int(n_features), int(rank), int(n_clusters)
        self.n_features, self.rank, self.n_clusters = D, R, C
        self.min_variance = float(min_variance)
        self.weights_in_state = bool(weights_in_state)
        self.solver = dict(method=method, step_size=step_size, rtol=rtol, atol=atol,
                           adjoint=adjoint)
        if image_shape is not None:
            H, W, ch = (int(s) for s in image_shape)
            if H * W * ch != D:
                raise ValueError(
                    f"image_shape={image_shape} has {H * W * ch} values but the data has "
                    f"{D} features."
                )
            base_channels = ch * (R + 2) + (1 if self.weights_in_state else 0)
            aug_channels = int(math.ceil(augment_factor * base_channels))
            self.weight_slot = H * W if self.weights_in_state else 0
            self.aug_dim = aug_channels * H * W
            n_extra = aug_channels + (1 if self.weights_in_state else 0)

            def make_func():
                return ODEFuncCNN((H, W, ch), R + 2, n_extra, hidden, depth, activation)
        else:
            base = D * (R + 2) + (1 if self.weights_in_state else 0)
            self.weight_slot = 1 if self.weights_in_state else 0
            self.aug_dim = int(math.ceil(augment_factor * base))

            def make_func():
                return ODEFuncMLP(base + self.aug_dim, hidden, depth, activation)
        self.state_dim = D * (R + 2) + self.weight_slot + self.aug_dim
        func = make_func() if shared_ode else _PerClusterFunc([make_func() for _ in range(C)])
        self.func = _Checkpointed(func) if checkpoint else func
        self.initial_state = nn.Parameter(torch.empty(C, self.state_dim))
        self.cluster_logits = nn.Parameter(torch.empty(C))
        self.register_buffer("shift", torch.empty(D))
        self.register_buffer("scale", torch.empty(D))
        self.register_buffer("log_floor", torch.empty(D))

    def reset_parameters(self, generator):
        """Initialise every parameter and buffer (ODE layers from ``generator``)."""
        self.func.reset_parameters(generator)
        self.initial_state.zero_()
        self.cluster_logits.zero_()
        D = self.n_features
        self.set_standardization(self.shift.new_zeros(D), self.scale.new_ones(D))

    def set_standardization(self, shift, scale, mean_variance=1.0):
        """Standardise the data as ``z = (y - shift) / scale`` (per feature),
        with the noise-variance floor ``min_variance * mean_variance`` in the
        data's units (``log_floor`` in the standardised units)."""
        self.shift.copy_(shift)
        self.scale.copy_(scale)
        floor = math.log(self.min_variance * float(mean_variance))
        self.log_floor.copy_(floor - 2.0 * torch.log(self.scale))

    # ------------------------------------------------------------ state layout
    def init_state(self, means, log_noise, loadings_scale=0.1, alpha_scale=0.0,
                   generator=None):
        """Set the initial states from means ``(C, D)`` and log noise ``(C, D)``.

        Loadings start as ``loadings_scale * N(0, 1)``, the augmentation as
        ``alpha_scale * N(0, 1)`` (both drawn from ``generator``).
        """
        D, R, C = self.n_features, self.rank, self.n_clusters
        h = self.initial_state
        opts = dict(dtype=h.dtype, device=h.device, generator=generator)
        with torch.no_grad():
            h.zero_()
            h[:, :D] = means
            h[:, D : D + R * D] = loadings_scale * torch.randn(C, R * D, **opts)
            # invert the soft clip: raw = floor + log(expm1(log d - floor))
            gap = (log_noise - self.log_floor).clamp_min(1e-4)
            h[:, D + R * D : D * (R + 2)] = self.log_floor + torch.log(torch.expm1(gap))
            if alpha_scale > 0:
                h[:, self.state_dim - self.aug_dim :] = alpha_scale * torch.randn(
                    C, self.aug_dim, **opts
                )

    def init_random(self, generator, spread=0.7):
        """Random start states for a latent ``N(0, I)`` space (curriculum).

        Means ``spread * N(0, I)``, noise variances ``1 - spread**2``: the
        components are spread over the latent normal and narrower than it, so
        that the mixture does not start at the symmetric saddle point where
        all components are equal.
        """
        C, D = self.n_clusters, self.n_features
        opts = dict(dtype=self.initial_state.dtype, device=self.initial_state.device)
        means = spread * torch.randn(C, D, generator=generator, **opts)
        log_noise = torch.full((C, D), math.log(1.0 - spread**2), **opts)
        self.init_state(means, log_noise, generator=generator)

    def split_state(self, h):
        """MFA parameters of states ``h`` of shape ``(..., state_dim)``.

        Returns
        -------
        means : (..., D)
        loadings : (..., D, R)
        log_noise_var : (..., D)   soft-clipped from below at ``log(min_variance)``
        log_weight : (...,) or None
        """
        D, R = self.n_features, self.rank
        means = h[..., :D]
        loadings = h[..., D : D + R * D].unflatten(-1, (R, D)).transpose(-1, -2)
        raw = h[..., D + R * D : D * (R + 2)]
        log_noise = self.log_floor + F.softplus(raw - self.log_floor)
        log_weight = None
        if self.weights_in_state:
            log_weight = h[..., D * (R + 2) : D * (R + 2) + self.weight_slot].mean(-1)
        return means, loadings, log_noise, log_weight

    # ------------------------------------------------------------------ solve
    def trajectory(self, times, columns=None):
        """States at ``times`` (increasing, in ``[0, 1]``): ``(C, T, state_dim)``.

        ``columns``: return only the first ``columns`` entries of the state
        (e.g. the MFA parameters without the augmentation).
        """
        times = times.to(self.initial_state)
        columns = self.state_dim if columns is None else int(columns)
        if self.solver["method"] not in FIXED_STEP_METHODS:
            starts_at_zero = bool(times[0] == 0)
            grid = times if starts_at_zero else torch.cat([times.new_zeros(1), times])
            states = solve_ode(self.func, self.initial_state, grid, **self.solver)
            return states[int(not starts_at_zero):, :, :columns].transpose(0, 1)
        # solve on the solver's own grid and interpolate between its points (what
        # torchdiffeq's fixed-step solvers do) with two matrix products: asking
        # torchdiffeq for many output times costs a full copy of the solution
        # per output time in the backward pass
        step = float(self.solver["step_size"])
        n_steps = max(1, int(math.ceil(1.0 / step - 1e-9)))
        grid = torch.arange(n_steps + 1, dtype=times.dtype, device=times.device) * step
        grid[-1] = 1.0
        method = self.solver["method"]
        if method in EXPLICIT_STEPPERS and not self.solver["adjoint"]:
            states, slopes = fixed_grid_solve(self.func, self.initial_state, grid, method)
        else:
            states, slopes = solve_ode(self.func, self.initial_state, grid, **self.solver), None
        state_weights, slope_weights = _interpolation_weights(grid, times, self.interp)
        out = torch.einsum("tn,ncs->cts", state_weights, states[..., :columns])
        if slope_weights is not None:
            if slopes is None:
                slopes = [self.func(g, h) for g, h in zip(grid[:-1], states[:-1])]
            slopes = torch.stack(slopes + [self.func(grid[-1], states[-1])])
            out = out + torch.einsum("tn,ncs->cts", slope_weights, slopes[..., :columns])
        return out

    def components(self, times):
        """Mixture parameters at ``times``.

        Returns
        -------
        log_weights : (C, T)  log eta_c + log pi_c(t_j) (sums to one overall)
        means : (C, T, D)
        loadings : (C, T, D, R)
        log_noise_var : (C, T, D)
        """
        states = self.trajectory(times, self.state_dim - self.aug_dim)
        means, loadings, log_noise, log_w = self.split_state(states)
        T = states.shape[1]
        if log_w is None:
            log_pi = torch.full((self.n_clusters, T), -math.log(T), dtype=states.dtype,
                                device=states.device)
        else:
            log_pi = torch.log_softmax(log_w, dim=1)
        log_eta = torch.log_softmax(self.cluster_logits, dim=0)
        return log_eta[:, None] + log_pi, means, loadings, log_noise

    def log_prob(self, Z, times):
        """``(log p(z), log p(z, c))`` of standardised rows through the ODE at ``times``.

        Returns
        -------
        log_prob : (n,)
        log_joint_clusters : (n, C)
        """
        return mixture_log_prob(Z, *self.components(times))

    def standardize(self, Y):
        """``(Y - shift) / scale`` and the log-Jacobian of the map (a float)."""
        return (Y - self.shift) / self.scale, -float(torch.log(self.scale).sum())


def mixture_log_prob(X, log_weights, means, loadings, log_noise_var):
    """Hierarchical MFA log-density from component parameters.

    No host synchronisation (a numerical breakdown gives NaN, see
    :func:`skdeepmix._gaussian.mfa_log_prob_unchecked`).

    Parameters
    ----------
    X : (n, D)
    log_weights : (C, G)
    means : (C, G, D)
    loadings : (C, G, D, R)
    log_noise_var : (C, G, D)

    Returns
    -------
    log_prob : (n,)
    log_joint_clusters : (n, C)   log p(x, c)
    """
    C, G, D = means.shape
    comp = mfa_log_prob_unchecked(
        X, means.reshape(C * G, D), loadings.reshape(C * G, D, -1),
        log_noise_var.reshape(C * G, D),
    ) + log_weights.reshape(1, C * G)
    joint = torch.logsumexp(comp.reshape(-1, C, G), dim=2)
    return torch.logsumexp(joint, dim=1), joint
