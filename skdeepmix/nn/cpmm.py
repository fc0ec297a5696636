"""Continuously parameterized mixtures (CPMM, Bender et al., ICML 2023) as torch modules.

A neural ODE evolves the joint state ``h(t) = [mu(t), vec A(t), log d(t),
(log pi(t)), alpha(t)]`` of a mixture of factor analysers along a pseudotime
``t in [0, 1]``. ``C`` learnable initial states (one per cluster) share one ODE
(or have one each); the components of cluster ``c`` are the MFA parameters read
off the state at ``G`` pseudotimes, giving the hierarchical mixture

    p(x) = sum_c eta_c sum_j pi_c(t_j) N(x; mu_c(t_j), A_c(t_j) A_c(t_j)^T + D_c(t_j)).

State layout (per trajectory, flattened): ``[mu (D), A (R blocks of D),
raw log d (D), log-weight slot (1 for vectors, H*W for images; only when the
weights are in the state), alpha (augmentation)]``. For image-shaped data the
same vector is a stack of channels ``(n_channels, H, W)`` so that a CNN can act
on it. ``log d`` is soft-clipped from below: ``floor + softplus(raw - floor)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchdiffeq import odeint, odeint_adjoint

from .._gaussian import mfa_log_prob

__all__ = [
    "ODEFuncMLP",
    "ODEFuncCNN",
    "CPMMNet",
    "FIXED_STEP_METHODS",
    "ADAPTIVE_METHODS",
    "solve_ode",
]

FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


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
        with torch.no_grad():
            self.layers[-1].weight.mul_(out_scale)
            self.layers[-1].bias.zero_()
        self.nfe = 0

    def forward(self, t, h):
        self.nfe += 1
        out = torch.cat([h, t.to(h).expand(h.shape[0], 1)], dim=1)
        for layer in self.layers[:-1]:
            out = self.act(layer(out))
        return self.layers[-1](out)


class ODEFuncCNN(nn.Module):
    """Non-autonomous ODE function on image-shaped state: a small CNN.

    The flattened state of each trajectory is viewed as ``(n_channels, H, W)``;
    the pseudotime is concatenated as an extra constant channel; ``depth``
    3x3 convolutions (``hidden`` channels) with ``activation`` in between.

    Parameters
    ----------
    n_channels : int
        Channels of the state (mean, R loadings, log d, weights, augmentation).
    spatial : tuple (H, W)
    hidden : int
    depth : int
    activation : {'sin', 'tanh', 'softplus'}
    out_scale : float
    """

    def __init__(self, n_channels, spatial, hidden=64, depth=3, activation="sin",
                 out_scale=0.1):
        super().__init__()
        self.n_channels = int(n_channels)
        self.spatial = tuple(int(s) for s in spatial)
        dims = [n_channels + 1] + [hidden] * (depth - 1) + [n_channels]
        self.layers = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(dims[:-1], dims[1:])
        )
        self.act = make_activation(activation)
        with torch.no_grad():
            self.layers[-1].weight.mul_(out_scale)
            self.layers[-1].bias.zero_()
        self.nfe = 0

    def forward(self, t, h):
        self.nfe += 1
        B = h.shape[0]
        H, W = self.spatial
        out = h.reshape(B, self.n_channels, H, W)
        tt = t.to(h).expand(B, 1, H, W)
        out = torch.cat([out, tt], dim=1)
        for layer in self.layers[:-1]:
            out = self.act(layer(out))
        return self.layers[-1](out).reshape(B, -1)


class _PerClusterFunc(nn.Module):
    """One ODE function per trajectory (``shared_ode=False``)."""

    def __init__(self, funcs):
        super().__init__()
        self.funcs = nn.ModuleList(funcs)

    def forward(self, t, h):
        return torch.cat([f(t, h[c : c + 1]) for c, f in enumerate(self.funcs)], dim=0)


class _Checkpointed(nn.Module):
    """Gradient checkpointing around an ODE function (recompute in backward)."""

    def __init__(self, func):
        super().__init__()
        self.func = func

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


class CPMMNet(nn.Module):
    """Hierarchical continuously parameterized mixture of factor analysers.

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
    image_shape : tuple or None
        ``(H, W)`` or ``(n_channels, H, W)``: use the CNN ODE function.
    shared_ode : bool
        One ODE for all trajectories (paper default) or one per trajectory.
    weights_in_state : bool
        Put ``log pi`` in the state (else ``pi_c(t_j) = 1/G``).
    min_log_noise : float
        Soft floor of ``log d``.
    method, step_size, rtol, atol, adjoint, checkpoint :
        Solver settings (see :func:`solve_ode`).
    interp : {'cubic', 'linear'}
        Interpolation between the steps of fixed-step solvers (as torchdiffeq's
        ``interp`` option; cubic Hermite uses the ODE's slopes, C^1 trajectories).
    """

    def __init__(self, n_features, n_clusters, rank, *, augment_factor=2.0, hidden=128,
                 depth=3, activation="sin", image_shape=None, shared_ode=True,
                 weights_in_state=False, min_log_noise=-6.0, method="rk4", step_size=0.1,
                 rtol=1e-3, atol=1e-4, adjoint=False, checkpoint=False, interp="cubic"):
        super().__init__()
        if interp not in ("cubic", "linear"):
            raise ValueError(f"interp must be 'cubic' or 'linear', got {interp!r}.")
        self.interp = interp
        D, R, C = int(n_features), int(rank), int(n_clusters)
        self.n_features, self.rank, self.n_clusters = D, R, C
        self.min_log_noise = float(min_log_noise)
        self.weights_in_state = bool(weights_in_state)
        self.solver = dict(method=method, step_size=step_size, rtol=rtol, atol=atol,
                           adjoint=adjoint)
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
        if self.image_shape is not None:
            shape = self.image_shape if len(self.image_shape) == 3 else (1,) + self.image_shape
            ch, H, W = shape
            if ch * H * W != D:
                raise ValueError(
                    f"image_shape={image_shape} has {ch * H * W} values but the data has "
                    f"{D} features."
                )
            base_channels = ch * (R + 2) + (1 if self.weights_in_state else 0)
            aug_channels = int(math.ceil(augment_factor * base_channels))
            self.n_channels = base_channels + aug_channels
            self.weight_slot = H * W if self.weights_in_state else 0
            self.aug_dim = aug_channels * H * W
            make_func = lambda: ODEFuncCNN(self.n_channels, (H, W), hidden, depth, activation)
        else:
            base = D * (R + 2) + (1 if self.weights_in_state else 0)
            self.weight_slot = 1 if self.weights_in_state else 0
            self.aug_dim = int(math.ceil(augment_factor * base))
            make_func = lambda: ODEFuncMLP(base + self.aug_dim, hidden, depth, activation)
        self.state_dim = D * (R + 2) + self.weight_slot + self.aug_dim
        if shared_ode:
            func = make_func()
        else:
            func = _PerClusterFunc([make_func() for _ in range(C)])
        self.func = _Checkpointed(func) if checkpoint else func
        self.initial_state = nn.Parameter(torch.zeros(C, self.state_dim))
        self.cluster_logits = nn.Parameter(torch.zeros(C))

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
            # invert the soft clip: raw = floor + log(expm1(logd - floor))
            gap = (log_noise - self.min_log_noise).clamp_min(1e-4)
            h[:, D + R * D : D * (R + 2)] = self.min_log_noise + torch.log(torch.expm1(gap))
            if alpha_scale > 0:
                h[:, self.state_dim - self.aug_dim :] = alpha_scale * torch.randn(
                    C, self.aug_dim, **opts
                )

    def split_state(self, h):
        """MFA parameters of states ``h`` of shape ``(..., state_dim)``.

        Returns
        -------
        means : (..., D)
        loadings : (..., D, R)
        log_noise_var : (..., D)   soft-clipped from below at ``min_log_noise``
        log_weight : (...,) or None
        """
        D, R = self.n_features, self.rank
        means = h[..., :D]
        loadings = h[..., D : D + R * D].unflatten(-1, (R, D)).transpose(-1, -2)
        raw = h[..., D + R * D : D * (R + 2)]
        floor = self.min_log_noise
        log_noise = floor + F.softplus(raw - floor)
        log_weight = None
        if self.weights_in_state:
            log_weight = h[..., D * (R + 2) : D * (R + 2) + self.weight_slot].mean(-1)
        return means, loadings, log_noise, log_weight

    # ------------------------------------------------------------------ solve
    def trajectory(self, times):
        """States at ``times`` (increasing, in ``[0, 1]``): ``(C, T, state_dim)``."""
        times = times.to(self.initial_state)
        if self.solver["method"] in FIXED_STEP_METHODS:
            # solve on the solver's own grid, then interpolate linearly (what
            # torchdiffeq does between grid points) with one gather: asking
            # torchdiffeq for many output times costs a full copy of the
            # solution per output time in the backward pass
            step = float(self.solver["step_size"])
            n_steps = max(1, int(math.ceil(1.0 / step - 1e-9)))
            grid = torch.arange(n_steps + 1, dtype=times.dtype, device=times.device) * step
            grid[-1] = 1.0
            states = solve_ode(self.func, self.initial_state, grid, **self.solver)
            idx = torch.searchsorted(grid, times.detach(), right=True).clamp(1, n_steps)
            lo, hi = grid[idx - 1], grid[idx]
            dt = (hi - lo)[:, None, None]
            w = ((times - lo) / (hi - lo)).clamp(0.0, 1.0)[:, None, None]
            y0, y1 = states[idx - 1], states[idx]
            if self.interp == "linear":
                out = y0 * (1 - w) + y1 * w
            else:  # cubic Hermite with the ODE's slopes at the grid points
                slopes = torch.stack([self.func(g, h) for g, h in zip(grid, states)])
                f0, f1 = slopes[idx - 1], slopes[idx]
                w2, w3 = w * w, w * w * w
                out = ((2 * w3 - 3 * w2 + 1) * y0 + (w3 - 2 * w2 + w) * dt * f0
                       + (3 * w2 - 2 * w3) * y1 + (w3 - w2) * dt * f1)
            return out.transpose(0, 1)
        starts_at_zero = bool(times[0] == 0)
        grid = times if starts_at_zero else torch.cat([times.new_zeros(1), times])
        states = solve_ode(self.func, self.initial_state, grid, **self.solver)
        if not starts_at_zero:
            states = states[1:]
        return states.transpose(0, 1)

    def components(self, times):
        """Mixture parameters at ``times``.

        Returns
        -------
        log_weights : (C, T)  log eta_c + log pi_c(t_j) (sums to one overall)
        means : (C, T, D)
        loadings : (C, T, D, R)
        log_noise_var : (C, T, D)
        """
        states = self.trajectory(times)
        means, loadings, log_noise, log_w = self.split_state(states)
        T = states.shape[1]
        if log_w is None:
            log_pi = torch.full((self.n_clusters, T), -math.log(T), dtype=states.dtype,
                                device=states.device)
        else:
            log_pi = torch.log_softmax(log_w, dim=1)
        log_eta = torch.log_softmax(self.cluster_logits, dim=0)
        return log_eta[:, None] + log_pi, means, loadings, log_noise

    def log_prob(self, X, times):
        """``(log p(x), log p(x, c))`` through the ODE at ``times``.

        Returns
        -------
        log_prob : (n,)
        log_joint_clusters : (n, C)
        """
        log_w, means, loadings, log_noise = self.components(times)
        return mixture_log_prob(X, log_w, means, loadings, log_noise)


def mixture_log_prob(X, log_weights, means, loadings, log_noise_var):
    """Hierarchical MFA log-density from component parameters.

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
    comp = mfa_log_prob(
        X, means.reshape(C * G, D), loadings.reshape(C * G, D, -1),
        log_noise_var.reshape(C * G, D),
    ) + log_weights.reshape(1, C * G)
    joint = torch.logsumexp(comp.reshape(-1, C, G), dim=2)
    return torch.logsumexp(joint, dim=1), joint
