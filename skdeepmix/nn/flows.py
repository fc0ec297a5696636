"""A continuous normalizing flow (FFJORD-style) used as the CPMM curriculum teacher.

``u_v(x)`` solves ``du/ds = g(u, s)`` from ``u_0 = x`` to ``s = v``; the flow is
trained by maximum likelihood so that ``u_1(x) ~ N(0, I)``:

    log p(x) = log N(u_1(x); 0, I) + int_0^1 tr(dg/du)(u_s, s) ds,

with the trace estimated by Hutchinson's estimator ``e^T (dg/du) e`` (one
Gaussian probe ``e`` per sample and solve, a vector-Jacobian product per step).

The dynamics may have a linear term, ``g(u, s) = W u + b + MLP(u, s)``, whose
trace ``tr W`` is exact (only the MLP's trace is estimated).
:meth:`CNF.init_gaussian` sets ``W = -1/2 log(Sigma)`` and ``b`` (from the
mean) and zeroes the MLP's output, so that before any training the flow is the
maximum-likelihood Gaussian: ``u_1(x) = Sigma^{-1/2} (x - m)`` (ZCA whitening),
``u_v(x)`` a smooth path from the data to whitened data, and the MLP only has
to learn the non-Gaussian part.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._torch_utils import init_layers_
from .cpmm import make_activation, solve_ode

__all__ = ["CNFDynamics", "CNF"]


class CNFDynamics(nn.Module):
    """``g(u, s)``: an MLP whose every layer also sees the time ``s``.

    Parameters
    ----------
    n_features : int
    hidden : int
    depth : int
        Number of linear layers (>= 2).
    activation : {'tanh', 'softplus', 'sin'}
    linear : bool
        Add a linear term ``W u + b`` (``W``, ``b`` zero at construction).
    """

    def __init__(self, n_features, hidden=64, depth=3, activation="tanh", linear=False):
        super().__init__()
        dims = [n_features] + [hidden] * (depth - 1) + [n_features]
        self.layers = nn.ModuleList(nn.Linear(a + 1, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = make_activation(activation)
        self.linear = nn.Linear(n_features, n_features) if linear else None
        self.nfe = 0

    def reset_parameters(self, generator):
        """Default initialisation of the MLP from ``generator``; ``W = 0``, ``b = 0``."""
        init_layers_(self, generator)
        if self.linear is not None:
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def nonlinear(self, t, u):
        """The MLP part of ``g(u, t)``."""
        tt = t.to(u).expand(u.shape[0], 1)
        out = u
        for i, layer in enumerate(self.layers):
            out = layer(torch.cat([out, tt], dim=1))
            if i < len(self.layers) - 1:
                out = self.act(out)
        return out

    def linear_trace(self):
        """``tr W`` (0 without the linear term)."""
        if self.linear is None:
            return 0.0
        return torch.diagonal(self.linear.weight).sum()

    def forward(self, t, u):
        self.nfe += 1
        out = self.nonlinear(t, u)
        if self.linear is not None:
            out = out + self.linear(u)
        return out


class _TraceAugmented(nn.Module):
    """Dynamics of ``(u, int tr)`` with a Hutchinson probe ``probe``."""

    def __init__(self, dynamics):
        super().__init__()
        self.dynamics = dynamics
        self.probe = None

    def forward(self, t, state):
        u, _ = state
        dyn = self.dynamics
        dyn.nfe += 1
        with torch.enable_grad():
            if not u.requires_grad:
                u = u.requires_grad_(True)
            du = dyn.nonlinear(t, u)
            vjp = torch.autograd.grad(du, u, self.probe, create_graph=True)[0]
        # Hutchinson for the MLP, exact for the linear term
        trace = (vjp * self.probe).sum(dim=1) + dyn.linear_trace()
        if dyn.linear is not None:
            du = du + dyn.linear(u)
        return du, trace


class CNF(nn.Module):
    """Continuous normalizing flow from data (``s=0``) to N(0, I) (``s=1``).

    Parameters
    ----------
    n_features : int
    hidden, depth, activation :
        The dynamics MLP (see :class:`CNFDynamics`).
    linear : bool
        Linear term in the dynamics (see :meth:`init_gaussian`).
    method, step_size, rtol, atol, adjoint :
        Solver settings (see :func:`skdeepmix.nn.cpmm.solve_ode`).
    """

    def __init__(self, n_features, hidden=64, depth=3, activation="tanh", *, linear=False,
                 method="rk4", step_size=0.25, rtol=1e-4, atol=1e-5, adjoint=False):
        super().__init__()
        self.n_features = int(n_features)
        self.dynamics = CNFDynamics(n_features, hidden, depth, activation, linear=linear)
        self.solver = dict(method=method, step_size=step_size, rtol=rtol, atol=atol,
                           adjoint=adjoint)

    def reset_parameters(self, generator):
        """Initialise every parameter from ``generator`` (see :meth:`CNFDynamics.reset_parameters`)."""
        self.dynamics.reset_parameters(generator)

    @torch.no_grad()
    def init_gaussian(self, mean, cov, reg=1e-2):
        """Start at the Gaussian ``N(mean, cov)`` (needs ``linear=True``).

        ``W = -1/2 log(Sigma + reg I)`` (symmetric matrix logarithm) and
        ``b = -W (e^W - I)^{-1} e^W m`` make the linear ODE ``du/ds = W u + b``
        map ``x`` to ``(Sigma + reg I)^{-1/2} (x - m)`` at ``s = 1``; the MLP's last
        layer is zeroed so that it starts as a correction of zero. ``reg``
        (relative to the mean variance) keeps the flow well conditioned.

        Parameters
        ----------
        mean : Tensor of shape (n_features,)
        cov : Tensor of shape (n_features, n_features)
            E.g. the maximum-likelihood mean and covariance of the data.
        """
        dyn = self.dynamics
        if dyn.linear is None:
            raise ValueError("init_gaussian needs a CNF built with linear=True.")
        m = mean.double()
        cov = cov.double()
        cov = cov + reg * torch.diagonal(cov).mean().clamp_min(1e-12) * torch.eye(
            self.n_features, dtype=cov.dtype, device=cov.device)
        evals, evecs = torch.linalg.eigh(cov)
        w = -0.5 * torch.log(evals.clamp_min(1e-12))
        W = (evecs * w) @ evecs.T
        # b = -W (e^W - I)^{-1} e^W m, so that u_1 = e^W (x - m) has mean zero
        safe = torch.where(w.abs() < 1e-8, torch.ones_like(w), w)
        factor = torch.where(w.abs() < 1e-8, torch.ones_like(w), safe / -torch.expm1(-safe))
        b = -(evecs * factor) @ (evecs.T @ m)
        dyn.linear.weight.copy_(W.to(dyn.linear.weight))
        dyn.linear.bias.copy_(b.to(dyn.linear.bias))
        dyn.layers[-1].weight.zero_()
        dyn.layers[-1].bias.zero_()
        return self

    def log_prob(self, x, generator=None):
        """Hutchinson estimate of ``log p(x)`` (unbiased in the trace), shape (n,)."""
        func = _TraceAugmented(self.dynamics)
        func.probe = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        times = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        zero = x.new_zeros(x.shape[0])
        u, trace = solve_ode(func, (x, zero), times, **self.solver)
        z = u[-1]
        log_normal = -0.5 * (z * z).sum(1) - 0.5 * self.n_features * math.log(2 * math.pi)
        return log_normal + trace[-1]

    @torch.no_grad()
    def transform(self, x, times):
        """``u_v(x)`` for every ``v`` in ``times`` (increasing, from 0): (T, n, D)."""
        times = times.to(x)
        if bool(times[0] != 0):
            return solve_ode(self.dynamics, x, torch.cat([times.new_zeros(1), times]),
                             **self.solver)[1:]
        return solve_ode(self.dynamics, x, times, **self.solver)
