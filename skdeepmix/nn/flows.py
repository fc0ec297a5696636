"""A continuous normalizing flow (FFJORD-style) used as the CPMM curriculum teacher.

``u_v(x)`` solves ``du/ds = g(u, s)`` from ``u_0 = x`` to ``s = v``; the flow is
trained by maximum likelihood so that ``u_1(x) ~ N(0, I)``:

    log p(x) = log N(u_1(x); 0, I) + int_0^1 tr(dg/du)(u_s, s) ds,

with the trace estimated by Hutchinson's estimator ``e^T (dg/du) e`` (one
Gaussian probe ``e`` per sample and solve, a vector-Jacobian product per step).
"""

from __future__ import annotations

import math

import torch
from torch import nn

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
    """

    def __init__(self, n_features, hidden=64, depth=3, activation="tanh"):
        super().__init__()
        dims = [n_features] + [hidden] * (depth - 1) + [n_features]
        self.layers = nn.ModuleList(nn.Linear(a + 1, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = make_activation(activation)
        self.nfe = 0

    def forward(self, t, u):
        self.nfe += 1
        tt = t.to(u).expand(u.shape[0], 1)
        out = u
        for i, layer in enumerate(self.layers):
            out = layer(torch.cat([out, tt], dim=1))
            if i < len(self.layers) - 1:
                out = self.act(out)
        return out


class _TraceAugmented(nn.Module):
    """Dynamics of ``(u, int tr)`` with a Hutchinson probe ``probe``."""

    def __init__(self, dynamics):
        super().__init__()
        self.dynamics = dynamics
        self.probe = None

    def forward(self, t, state):
        u, _ = state
        with torch.enable_grad():
            if not u.requires_grad:
                u = u.requires_grad_(True)
            du = self.dynamics(t, u)
            vjp = torch.autograd.grad(du, u, self.probe, create_graph=True)[0]
        trace = (vjp * self.probe).sum(dim=1)
        return du, trace


class CNF(nn.Module):
    """Continuous normalizing flow from data (``s=0``) to N(0, I) (``s=1``).

    Parameters
    ----------
    n_features : int
    hidden, depth, activation :
        The dynamics MLP (see :class:`CNFDynamics`).
    method, step_size, rtol, atol, adjoint :
        Solver settings (see :func:`skdeepmix.nn.cpmm.solve_ode`).
    """

    def __init__(self, n_features, hidden=64, depth=3, activation="tanh", *,
                 method="rk4", step_size=0.25, rtol=1e-4, atol=1e-5, adjoint=False):
        super().__init__()
        self.n_features = int(n_features)
        self.dynamics = CNFDynamics(n_features, hidden, depth, activation)
        self.solver = dict(method=method, step_size=step_size, rtol=rtol, atol=atol,
                           adjoint=adjoint)

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
