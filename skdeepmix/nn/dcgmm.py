"""Deep convolutional Gaussian mixture models (DCGMM) as plain torch modules.

Gepperth, "A new perspective on probabilistic image modeling" (the DCGMM paper).
Tensors are NHWC throughout: ``(n_samples, height, width, channels)``.

Every layer has a *forward* (density) mode, :meth:`forward`, and a *backward*
(sampling) mode, :meth:`backwards`, which turns a control signal for the
layer's output into a control signal (or a sample) for its input:

``Folding(f, stride)`` -- ``F(f, Δ)``
    Half-convolution: the ``f x f`` patch at every position (stride ``Δ``) is
    copied into the channels, ordered ``(row, column, channel)`` with the
    channel fastest (the paper's eq. 9). Backward: every input element is the
    average of all the output entries it was copied to (exact when
    ``stride == f``).
``MaxPooling(f, stride)`` -- ``P(f, Δ)``
    CNN max-pooling. Backward: up-sampling (every input element receives the
    average of the control signals of the windows that cover it).
``ConvGMM(K, shared=True)`` -- ``G(K)``
    A diagonal-precision GMM applied at every position; the activities are the
    posteriors. Parameters are shared over positions (default) or independent
    per position. Trained on the max-component log-likelihood, smoothed over a
    toroidal ``sqrt(K) x sqrt(K)`` grid of components with an annealed
    Gaussian kernel (as in the author's reference code). Backward: sampling
    with the control signal as hierarchical prior (top-S selection).
``LinearClassifier(S)`` -- ``C(S)``
    Softmax regression on the activities of chosen ``G`` layers. Backward: the
    approximate inverse ``W^T (log T - b)`` shifted to be positive.

:func:`parse_layers` reads the paper's notation (``"F(3,1)-G(25)-F(4,2)-G(25)"``)
and :class:`DCGMMNet` builds a stack of layers, gives the per-sample training
losses (every ``G`` layer's own loss on its detached input, plus the
classifier's), the plain SGD optimizer with per-layer, per-parameter-kind
learning rates and the post-step projection and annealing, and samples.
"""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn

from .._gaussian import LOG_2PI, log_gaussian_prob

__all__ = [
    "Folding",
    "MaxPooling",
    "ConvGMM",
    "LinearClassifier",
    "parse_layers",
    "format_layers",
    "DCGMMNet",
]

#: smallest square-root precision (the projection after every step keeps it positive)
_MIN_PREC_SQRT = 1e-3

def _as_pair(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}.")
        pair = tuple(value)
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be positive integers, got {value!r}.")
    return pair


# --------------------------------------------------------------------------- #
# index-based layers (folding and pooling)                                    #
# --------------------------------------------------------------------------- #
class _WindowLayer(nn.Module):
    """Common code of the folding and pooling layers (windows over H and W)."""

    letter = "?"

    def __init__(self, kernel_size=None, stride=None):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.in_shape = None
        self.out_shape = None

    def _window_geometry(self, in_shape):
        H, W, C = in_shape
        if self.kernel_size is None:  # fold the whole input
            kh, kw = H, W
        else:
            kh, kw = _as_pair(self.kernel_size, f"{self.letter} kernel size")
        if self.stride is None:
            sh, sw = (kh, kw) if self.kernel_size is not None else (1, 1)
        else:
            sh, sw = _as_pair(self.stride, f"{self.letter} stride")
        if kh > H or kw > W:
            raise ValueError(
                f"Layer {self!r}: kernel {kh}x{kw} is larger than its input "
                f"{H}x{W}x{C}; use a smaller kernel (or check image_shape)."
            )
        Ho = 1 + (H - kh) // sh
        Wo = 1 + (W - kw) // sw
        return kh, kw, sh, sw, Ho, Wo

    def _build_index(self, in_shape, device):
        """Flat input index of every (position, kernel row, kernel col, channel)."""
        H, W, C = in_shape
        kh, kw, sh, sw, Ho, Wo = self._window_geometry(in_shape)
        oy = torch.arange(Ho, device=device) * sh
        ox = torch.arange(Wo, device=device) * sw
        ky = torch.arange(kh, device=device)
        kx = torch.arange(kw, device=device)
        c = torch.arange(C, device=device)
        rows = oy[:, None, None, None, None] + ky[None, None, :, None, None]
        cols = ox[None, :, None, None, None] + kx[None, None, None, :, None]
        index = (rows * W + cols) * C + c[None, None, None, None, :]
        # (Ho, Wo, kh, kw, C)
        counts = torch.zeros(H * W * C, device=device)
        counts.index_add_(0, index.reshape(-1), torch.ones(index.numel(), device=device))
        return index, counts, (kh, kw, Ho, Wo)

    def reset_parameters(self, generator=None):
        """Recompute the index buffers on their device (after ``to_empty``)."""
        self.build(self.in_shape, device=self.index_.device)

    def _scatter_mean(self, values, index, counts):
        """Average ``values`` (N, n_index) into the flat input (N, H*W*C)."""
        N = values.shape[0]
        out = values.new_zeros(N, counts.numel())
        out.index_add_(1, index, values)
        counts = counts.to(values.dtype)
        return torch.where(counts > 0, out / counts.clamp_min(1.0), out)

    @property
    def max_overlap(self):
        """Largest number of output entries an input element is copied to."""
        return float(self.counts_.max())

    def extra_repr(self):
        if self.kernel_size is None:
            return ""
        return f"{self.kernel_size},{self.stride if self.stride is not None else self.kernel_size}"

    def __repr__(self):
        if self.kernel_size is None and self.stride is None:
            return self.letter
        return f"{self.letter}({self.extra_repr()})"


class _FoldFunction(torch.autograd.Function):
    """Folding by strided views (fast) with a scatter-add backward (faster than
    the backward of ``Tensor.unfold``)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        ctx.in_shape = x.shape
        N = x.shape[0]
        kh, kw, sh, sw = layer.geometry_
        Ho, Wo, _ = layer.out_shape
        # (N, Ho, W, C, kh) -> (N, Ho, Wo, C, kh, kw) -> (N, Ho, Wo, kh, kw, C)
        patches = x.unfold(1, kh, sh).unfold(2, kw, sw)
        return patches.permute(0, 1, 2, 4, 5, 3).reshape(N, Ho, Wo, -1)

    @staticmethod
    def backward(ctx, grad):
        N = grad.shape[0]
        out = grad.new_zeros(N, math.prod(ctx.in_shape[1:]))
        out.index_add_(1, ctx.layer.index_, grad.reshape(N, -1))
        return out.reshape(ctx.in_shape), None


class Folding(_WindowLayer):
    """Folding / half-convolution layer ``F(f, stride)``.

    Parameters
    ----------
    kernel_size : int or (int, int), optional
        Patch size ``f``. ``None`` folds the whole input into one position.
    stride : int or (int, int), optional
        Stride ``Δ`` (default: ``kernel_size``).

    Notes
    -----
    Input ``(N, H, W, C)`` becomes ``(N, 1 + (H-f)//Δ, 1 + (W-f)//Δ, f*f*C)``;
    input rows/columns not covered by any patch (when ``Δ`` does not divide
    ``H - f``) are ignored forward and set to 0 backward.
    """

    letter = "F"

    def build(self, in_shape, device=None):
        H, W, C = in_shape
        index, counts, (kh, kw, Ho, Wo) = self._build_index(in_shape, device)
        self.register_buffer("index_", index.reshape(-1), persistent=False)
        self.register_buffer("counts_", counts, persistent=False)
        self.geometry_ = self._window_geometry(in_shape)[:4]
        self.in_shape = (H, W, C)
        self.out_shape = (Ho, Wo, kh * kw * C)
        return self.out_shape

    def forward(self, x):
        return _FoldFunction.apply(x, self)

    def backwards(self, t):
        """Average over the overlapping inverses: ``(N, Ho, Wo, f*f*C) -> (N, H, W, C)``."""
        N = t.shape[0]
        flat = self._scatter_mean(t.reshape(N, -1), self.index_, self.counts_)
        return flat.reshape(N, *self.in_shape)


class MaxPooling(_WindowLayer):
    """Max-pooling layer ``P(f, stride)``; backward mode is up-sampling.

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Default: ``kernel_size`` (non-overlapping pooling).
    """

    letter = "P"

    def __init__(self, kernel_size=2, stride=None):
        super().__init__(kernel_size, stride)

    def build(self, in_shape, device=None):
        H, W, C = in_shape
        index, counts, (kh, kw, Ho, Wo) = self._build_index(in_shape, device)
        # (Ho, Wo, C, kh*kw) so that the max runs over the last axis
        index = index.permute(0, 1, 4, 2, 3).reshape(Ho, Wo, C, kh * kw)
        self.register_buffer("index_", index.reshape(-1), persistent=False)
        self.register_buffer("counts_", counts, persistent=False)
        self.window_ = kh * kw
        self.in_shape = (H, W, C)
        self.out_shape = (Ho, Wo, C)
        return self.out_shape

    @property
    def max_overlap(self):
        return 1.0

    def forward(self, x):
        N = x.shape[0]
        windows = x.reshape(N, -1)[:, self.index_].reshape(N, *self.out_shape, self.window_)
        return windows.amax(dim=-1)

    def backwards(self, t):
        """Up-sampling: ``(N, Ho, Wo, C) -> (N, H, W, C)``."""
        N = t.shape[0]
        values = t.reshape(N, -1, 1).expand(-1, -1, self.window_).reshape(N, -1)
        flat = self._scatter_mean(values, self.index_, self.counts_)
        return flat.reshape(N, *self.in_shape)


# --------------------------------------------------------------------------- #
# convolutional GMM                                                           #
# --------------------------------------------------------------------------- #
# convolutional GMM                                                           #
# --------------------------------------------------------------------------- #
def _toroidal_grid_sq_distances(n_components, device=None):
    """Squared distances of K components placed on a toroidal grid (rows x cols)."""
    rows = max(int(math.floor(math.sqrt(n_components))), 1)
    cols = int(math.ceil(n_components / rows))
    k = torch.arange(n_components, device=device)
    y, x = (k // cols).double(), (k % cols).double()
    dy = (y[:, None] - y[None, :]).abs()
    dx = (x[:, None] - x[None, :]).abs()
    dy = torch.minimum(dy, rows - dy)
    dx = torch.minimum(dx, cols - dx)
    return dy**2 + dx**2


def _diag_log_prob(x, means, prec_sqrt):
    return log_gaussian_prob(x, means, prec_sqrt, "diag")


#: log N(x_p; mu_pk, diag(s_pk)^-2) for every position p: (N, P, D) -> (N, P, K)
_per_position_log_prob = torch.vmap(_diag_log_prob, in_dims=(1, 0, 0), out_dims=1)


class _SmoothedMaxLogLikelihood(torch.autograd.Function):
    """A G layer's smoothed max-component log-likelihood, mean over positions.

    With ``r_m`` the smoothing-kernel row of the winning component of row
    ``m`` (one position of one sample; one-hot without smoothing) and ``w_m``
    the upstream gradient of its sample divided by the number of positions,
    the gradients are, per position group (one for shared parameters):

    * means: ``s^2 (A - c mu)``, with ``A = sum_m w_m r_m x_m^T``,
      ``c = sum_m w_m r_m``;
    * square-root precisions: ``c / s - s (B - 2 mu A + c mu^2)``, with
      ``B = sum_m w_m r_m (x_m^2)^T``;
    * weight logits: ``c - (sum_k c_k) softmax(logits)``.
    """

    @staticmethod
    def forward(ctx, layer, x, mu, prec_sqrt, logits):
        scores = layer.log_scores(x)  # (N, H, W, K)
        N, H, W, K = scores.shape
        flat = scores.reshape(-1, K)
        smoothed = flat if layer.kernel_is_identity else flat @ layer.smoothing_.T
        value, index = smoothed.max(dim=1)
        ctx.layer = layer
        ctx.save_for_backward(x, index)
        ctx.mark_non_differentiable(scores)
        return value.reshape(N, H * W).mean(dim=1), scores

    @staticmethod
    def backward(ctx, grad_log_lik, grad_scores):
        layer = ctx.layer
        x, index = ctx.saved_tensors
        N, H, W, D = x.shape
        mu, s, logits = layer.mu, layer.prec_sqrt, layer.weight_logits
        groups, K = logits.shape
        # weight of every row (sample n, position p): dL/dlog_lik_n / positions
        weight = (grad_log_lik / (H * W)).repeat_interleave(H * W)  # (M,)
        if layer.kernel_is_identity:
            r = weight.new_zeros(weight.shape[0], K).scatter_(1, index[:, None], weight[:, None])
        else:
            r = layer.smoothing_[index] * weight[:, None]  # (M, K)
        # [groups, K, M/groups] @ [groups, M/groups, 2D]: A and B in one product
        r = r.reshape(-1, groups, K).permute(1, 2, 0)
        x = x.reshape(-1, groups, D).transpose(0, 1)
        A, B = torch.matmul(r, torch.cat([x, x.square()], dim=-1)).split(D, dim=-1)
        c = r.sum(dim=-1)  # (groups, K)
        cc = c[..., None]
        grad_mu = s.square() * (A - cc * mu)
        grad_s = cc / s - s * (B - 2.0 * mu * A + cc * mu.square())
        grad_logits = c - c.sum(dim=1, keepdim=True) * torch.softmax(logits, dim=1)
        return None, None, grad_mu, grad_s, grad_logits


class ConvGMM(nn.Module):
    """Convolutional GMM layer ``G(K)`` with diagonal precisions.

    The parameters are the means ``mu``, the square roots of the diagonal
    precisions ``prec_sqrt`` (the reference code's "sigmas"; they are the
    precision Cholesky factors of :mod:`skdeepmix._gaussian`'s ``'diag'``
    parametrisation, projected after every step so that no variance falls
    below ``min_variance``) and the logits of the mixture weights
    (weights = softmax(logits)), each of shape ``(P, K, ...)`` with ``P = 1``
    when shared.

    Parameters
    ----------
    n_components : int, optional
        Number of components ``K``; ``None`` takes the ``n_components`` given
        to :meth:`build`.
    shared : bool, default=True
        Share the parameters over all positions (convolutional mode); else
        every position has its own GMM.
    """

    letter = "G"

    def __init__(self, n_components=None, shared=True):
        super().__init__()
        self.n_components = n_components
        self.shared = shared
        self.in_shape = None
        self.out_shape = None

    def __repr__(self):
        k = "" if self.n_components is None else str(self.n_components)
        if self.shared:
            return f"G({k})" if k else "G"
        return f"G({k + ',' if k else ''}shared=False)"

    # ---------------------------------------------------------------- build
    def build(self, in_shape, *, n_components=None, generator=None, dtype=None, device=None,
              mu_init=0.1, min_variance=0.05, sigma0=None, sigma_min=0.01, learning_rate=0.05,
              min_learning_rate=0.01, anneal_factor=0.9, anneal_window=100,
              anneal_delta=0.05):
        """Create the parameters for inputs of shape ``in_shape = (H, W, D)``.

        ``n_components`` is used when the layer was created without one. The
        parameters are initialised (:meth:`reset_parameters`) unless they live
        on the ``meta`` device. Returns the output shape ``(H, W, K)``.
        """
        if self.n_components is None:
            self.n_components = n_components
        K = self.n_components
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(
                f"G layer: the number of components must be a positive int, got {K!r}.")
        H, W, D = in_shape
        P = 1 if self.shared else H * W
        factory = dict(device=device, dtype=dtype)
        self.mu = nn.Parameter(torch.empty(P, K, D, **factory))
        self.prec_sqrt = nn.Parameter(torch.empty(P, K, D, **factory))
        self.weight_logits = nn.Parameter(torch.empty(P, K, **factory))
        self.register_buffer("smoothing_", torch.empty(K, K, **factory), persistent=False)
        self.register_buffer("grid_sq_dist_", torch.empty(K, K, **factory), persistent=False)
        self.mu_init = float(mu_init)
        self.max_precision = 1.0 / float(min_variance)
        # annealing state (python floats: part of the pickled / deep-copied module)
        self.sigma0 = 0.25 * math.sqrt(2 * K) if sigma0 is None else float(sigma0)
        self.sigma_min = float(sigma_min)
        self.min_learning_rate = float(min(min_learning_rate, learning_rate))
        self.anneal_factor = float(anneal_factor)
        self.anneal_window = int(anneal_window)
        self.anneal_delta = float(anneal_delta)
        self.learning_rate0 = float(learning_rate)
        self.in_shape = (H, W, D)
        self.out_shape = (H, W, K)
        if self.mu.device.type != "meta":
            self.reset_parameters(generator)
        return self.out_shape

    def reset_parameters(self, generator=None):
        """Means ``U(±mu_init)``, precisions at their bound, uniform weights,
        the initial smoothing width and learning rate."""
        with torch.no_grad():
            self.mu.uniform_(-self.mu_init, self.mu_init, generator=generator)
            self.prec_sqrt.fill_(math.sqrt(self.max_precision))
            self.weight_logits.zero_()
        self.sigma = self.sigma0
        self.learning_rate = self.learning_rate0
        self.n_updates = 0
        self.window_count, self.n_windows = 0, 0
        self.first_average = self.last_average = None
        self.register_buffer("window_loss_", self.mu.new_zeros(()), persistent=False)
        self.grid_sq_dist_.copy_(
            _toroidal_grid_sq_distances(self.n_components, self.grid_sq_dist_.device))
        self._update_kernel()

    def _update_kernel(self):
        """The normalised smoothing kernel of width ``sigma`` on the component grid.

        Below a width of about 0.027 the kernel is the identity to float64
        precision (the nearest neighbour's weight ``exp(-1 / (2 sigma^2))``
        underflows), and the smoothing is skipped (``kernel_is_identity``).
        """
        self.kernel_is_identity = self.sigma <= 0 or 0.5 / self.sigma**2 > 700.0
        if self.kernel_is_identity:
            self.smoothing_.copy_(torch.eye(self.n_components))
            return
        kernel = torch.exp(self.grid_sq_dist_ * (-0.5 / self.sigma**2))
        self.smoothing_.copy_(kernel / kernel.sum(dim=1, keepdim=True))

    @property
    def n_positions(self):
        return self.in_shape[0] * self.in_shape[1]

    def n_parameters(self):
        P, K, D = self.mu.shape
        return P * (2 * K * D + K - 1)

    # -------------------------------------------------------------- forward
    def log_scores(self, x):
        """``log pi_k + log N(x_hw; mu_k, diag(prec_k^-1))``: (N, H, W, D) -> (N, H, W, K)."""
        N, H, W, D = x.shape
        log_w = torch.log_softmax(self.weight_logits, dim=-1)  # (P, K)
        if self.shared:
            scores = _diag_log_prob(x.reshape(-1, D), self.mu[0], self.prec_sqrt[0]) + log_w[0]
        else:
            scores = _per_position_log_prob(x.reshape(N, H * W, D), self.mu, self.prec_sqrt)
            scores = scores + log_w
        return scores.reshape(N, H, W, -1)

    def forward(self, x):
        """Activities (posteriors): (N, H, W, D) -> (N, H, W, K)."""
        return torch.softmax(self.log_scores(x), dim=-1)

    @staticmethod
    def max_log_likelihood(log_scores):
        """Max-component log-likelihood, mean over positions: (N, H, W, K) -> (N,)."""
        return log_scores.amax(dim=-1).mean(dim=(1, 2))

    def log_density_bound(self):
        """The largest log-density a position can have under the variance floor,
        ``D/2 log(1 / (2 pi min_variance))`` (weights are at most 1)."""
        return 0.5 * self.in_shape[2] * (math.log(self.max_precision) - LOG_2PI)

    def smoothed_loss(self, log_scores):
        """Training objective (higher is better), per sample, shape (N,).

        The log-scores are smoothed with the annealed Gaussian kernel on the
        toroidal component grid before the max; equals
        :meth:`max_log_likelihood` once the kernel width is small.
        """
        smoothed = log_scores if self.kernel_is_identity else log_scores @ self.smoothing_.T
        return smoothed.amax(dim=-1).mean(dim=(1, 2))

    def training_log_likelihood(self, x):
        """:meth:`smoothed_loss` of :meth:`log_scores` with a closed-form gradient.

        Gives the same values as ``smoothed_loss(log_scores(x))`` and the
        same gradients with respect to the parameters (``x`` is a constant:
        no back-propagation between layers), computed in the backward pass
        from two weighted sums over the rows instead of by autograd through
        the density (see :class:`_SmoothedMaxLogLikelihood`).

        Returns
        -------
        log_lik : Tensor of shape (N,)
        log_scores : Tensor of shape (N, H, W, K), without gradient
        """
        return _SmoothedMaxLogLikelihood.apply(self, x.detach(), self.mu, self.prec_sqrt,
                                               self.weight_logits)

    # ------------------------------------------------------------- training
    def parameter_groups(self, learning_rate_factors):
        """SGD parameter groups: means, square-root precisions and weight
        logits, each with its learning-rate factor (factor 0: not trained).

        The learning rate of a group is ``learning_rate * factor``, times the
        number of positions for a per-position layer (which sees ``1/(H*W)``
        of the gradient of the mean over positions: the reference's
        ``loss_mult``); see :meth:`group_learning_rate`.
        """
        params = (self.mu, self.prec_sqrt, self.weight_logits)
        return [
            {"params": [p], "dcgmm_layer": self, "factor": float(f),
             "lr": self.group_learning_rate(f)}
            for p, f in zip(params, learning_rate_factors) if f
        ]

    def group_learning_rate(self, factor):
        return self.learning_rate * factor * (1.0 if self.shared else float(self.n_positions))

    def project_(self):
        """Post-step projection: square-root precisions in
        ``[1e-3, sqrt(1 / min_variance)]`` (the reference's clipping)."""
        with torch.no_grad():
            self.prec_sqrt.clamp_(min=_MIN_PREC_SQRT, max=math.sqrt(self.max_precision))

    def set_annealing(self, progress):
        """Scheduled annealing: geometric decay of the smoothing width and learning rate.

        Parameters
        ----------
        progress : float in [0, 1]
            0 gives ``sigma0`` and the initial learning rate, 1 gives
            ``sigma_min`` and ``min_learning_rate``.
        """
        progress = min(max(float(progress), 0.0), 1.0)
        sigma = self.sigma0 * (self.sigma_min / self.sigma0) ** progress
        self.learning_rate = self.learning_rate0 * (
            self.min_learning_rate / self.learning_rate0) ** progress
        if sigma != self.sigma:
            self.sigma = sigma
            self._update_kernel()

    def plateau_update(self, average):
        """The reference code's plateau rule, given the next window average of the loss.

        From the third window on, if the last improvement is below
        ``anneal_delta`` times the improvement since the first window, the
        smoothing width and the learning rate are multiplied by
        ``anneal_factor`` (down to their minima).
        """
        self.n_windows += 1
        if self.n_windows == 1:
            self.first_average = self.last_average = average
            return
        if self.n_windows > 2 and self.sigma > self.sigma_min:
            denom = self.last_average - self.first_average
            ratio = (average - self.last_average) / denom if denom != 0 else 0.0
            if -2 * self.anneal_delta < ratio < self.anneal_delta:
                self.sigma = max(self.sigma * self.anneal_factor, self.sigma_min)
                self.learning_rate = max(
                    self.learning_rate * self.anneal_factor, self.min_learning_rate
                )
                self._update_kernel()
        self.last_average = average

    def end_window_step(self, reduce=None):
        """Count one step of plateau annealing; at the end of a window of
        ``anneal_window`` steps read the accumulated loss (one host sync per
        window), average it (``reduce`` sums it over processes) and apply
        :meth:`plateau_update`."""
        self.window_count += 1
        if self.window_count < self.anneal_window:
            return
        total = float(self.window_loss_)
        if reduce is not None:
            total = reduce(total)
        self.window_loss_.zero_()
        self.window_count = 0
        self.plateau_update(total / self.anneal_window)

    # ------------------------------------------------------------- sampling
    def backwards(self, control, generator=None, top_s=3, sampling_divisor=20.0,
                  n_samples=None):
        """Sample the input of the layer given a control signal.

        Parameters
        ----------
        control : Tensor of shape (N, H, W, K) or None
            Hierarchical prior over the components at every position (any
            non-negative scores; only the ``top_s`` largest are kept and
            renormalised). ``None``: the mixture weights.
        generator : torch.Generator, optional
        top_s : int, default=3
            Keep the S largest entries of the control signal (0 keeps all).
        sampling_divisor : float, default=20.0
            Standard deviations are divided by this factor (reference code);
            dimensions whose precision sits at the upper bound get no noise.
        n_samples : int, optional
            Required when ``control`` is None.

        Returns
        -------
        sample : Tensor of shape (N, H, W, D)
        components : LongTensor of shape (N, H, W)
        """
        H, W, D = self.in_shape
        K = self.n_components
        if control is None:
            weights = torch.softmax(self.weight_logits.detach(), dim=-1)
            shape = (1, 1, 1, K) if self.shared else (1, H, W, K)
            control = weights.reshape(shape).expand(n_samples, H, W, K)
        control = control.detach().clamp_min(0.0)
        N = control.shape[0]
        probs = control.reshape(-1, K)
        if top_s and top_s < K:
            kth = torch.topk(probs, top_s, dim=1).values[:, -1:]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = probs + 1e-12 * (probs.sum(1, keepdim=True) <= 0)  # all zero: uniform
        z = torch.multinomial(probs, 1, generator=generator).reshape(N, H, W)
        if self.shared:
            mu = self.mu[0][z]
            s = self.prec_sqrt[0][z]
        else:
            pos = torch.arange(H * W, device=z.device).reshape(1, H, W).expand(N, H, W)
            mu = self.mu[pos, z]
            s = self.prec_sqrt[pos, z]
        mu, s = mu.detach(), s.detach()
        std = torch.where(
            s < math.sqrt(self.max_precision) * (1 - 1e-6), 1.0 / s, torch.zeros_like(s)
        )
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + noise * std / sampling_divisor, z


class LinearClassifier(nn.Module):
    """Linear softmax classifier ``C(S)`` on flattened activities.

    Parameters
    ----------
    n_classes : int, optional
        Number of classes ``S`` (default: taken from ``y`` at fit).
    """

    letter = "C"

    def __init__(self, n_classes=None):
        super().__init__()
        self.n_classes = n_classes

    def __repr__(self):
        return "C" if self.n_classes is None else f"C({self.n_classes})"

    def build(self, n_inputs, n_classes, *, generator=None, dtype=None, device=None):
        """Create (and, off the ``meta`` device, initialise) the weights."""
        self.weight = nn.Parameter(torch.empty(n_inputs, n_classes, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(n_classes, device=device, dtype=dtype))
        self.n_inputs = n_inputs
        self.n_classes_ = n_classes
        if self.weight.device.type != "meta":
            self.reset_parameters(generator)

    def reset_parameters(self, generator=None):
        """Truncated normal weights (std ``1/sqrt(n_inputs)``), zero biases."""
        with torch.no_grad():
            self.weight.normal_(generator=generator).clamp_(-2.0, 2.0)
            self.weight.div_(math.sqrt(self.n_inputs))
            self.bias.zero_()

    def forward(self, features):
        """Logits: (N, n_inputs) -> (N, S)."""
        return features @ self.weight + self.bias

    def backwards(self, target_proba):
        """Approximate inverse ``W (log T - b)``, shifted so that its minimum is 0.

        ``W`` and ``b`` are centred over the classes first (the softmax leaves
        their per-input constants undetermined).

        Parameters
        ----------
        target_proba : Tensor of shape (N, S)
            Desired class probabilities (e.g. nearly one-hot).

        Returns
        -------
        control : Tensor of shape (N, n_inputs), non-negative
        """
        # softmax is invariant to adding a constant to all logits, so every
        # input's weight row is only defined up to a constant (its sum over the
        # classes never changes under cross-entropy training): centre the rows
        # and the bias before inverting, else that arbitrary constant decides
        weight = self.weight.detach()
        weight = weight - weight.mean(dim=1, keepdim=True)
        bias = self.bias.detach() - self.bias.detach().mean()
        log_t = torch.log(target_proba)
        t = (log_t - log_t.mean(dim=1, keepdim=True) - bias) @ weight.T
        return t - t.amin(dim=1, keepdim=True)


# --------------------------------------------------------------------------- #
# layer specification                                                         #
# --------------------------------------------------------------------------- #
_LAYER_TYPES = {"F": Folding, "P": MaxPooling, "G": ConvGMM, "C": LinearClassifier}
_TOKEN = re.compile(r"^\s*([A-Za-z]+)\s*(?:\((.*)\))?\s*$")


def _parse_value(text, token):
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    raise ValueError(
        f"Malformed layer {token!r}: argument {text!r} is not an integer "
        "(or True/False for shared=...)."
    )


def _make_layer(letter, args, kwargs, token):
    usage = {
        "F": "F(f, stride), F(f) or F (whole input)",
        "P": "P(f, stride) or P(f)",
        "G": "G(K), G(K, shared=False), G or G(shared=False)",
        "C": "C(S) or C",
    }[letter]
    allowed_kw = {"F": set(), "P": set(), "G": {"shared"}, "C": set()}[letter]
    max_args = {"F": 2, "P": 2, "G": 1, "C": 1}[letter]
    min_args = {"F": 0, "P": 1, "G": 0, "C": 0}[letter]
    bad_kw = set(kwargs) - allowed_kw
    if bad_kw or not (min_args <= len(args) <= max_args):
        raise ValueError(f"Malformed layer {token!r}: expected {usage}.")
    for value in args:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"Malformed layer {token!r}: sizes must be positive integers ({usage})."
            )
    if "shared" in kwargs and not isinstance(kwargs["shared"], bool):
        raise ValueError(f"Malformed layer {token!r}: shared must be True or False.")
    return _LAYER_TYPES[letter](*args, **kwargs)


def parse_layers(spec):
    """Turn a layer specification into a list of fresh layer modules.

    Parameters
    ----------
    spec : str or list
        The paper's notation, layers joined by ``-``:
        ``"F(3,1)-G(25)-F(4,2)-G(25)-F(12,1)-G(25)"``. ``F`` without
        arguments folds the whole input into one position; ``G`` without
        ``K`` takes its number of components when the network is built;
        ``G(K, shared=False)`` gives every position its own GMM; an optional last
        ``C`` or ``C(S)`` marks the classifier. Or a list of layer objects
        (:class:`Folding`, :class:`MaxPooling`, :class:`ConvGMM`,
        :class:`LinearClassifier`) or of such strings; they are copied.

    Returns
    -------
    layers : list of nn.Module (unbuilt)

    Raises
    ------
    ValueError
        For malformed specifications.
    """
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError("The layer specification is empty; e.g. 'F(3,1)-G(25)-F-G(25)'.")
        tokens = spec.split("-")
        layers = []
        for token in tokens:
            match = _TOKEN.match(token)
            if match is None or match.group(1).upper() not in _LAYER_TYPES:
                raise ValueError(
                    f"Malformed layer {token!r} in {spec!r}: layers are F(f,stride), "
                    "P(f,stride), G(K) or C(S), joined by '-'."
                )
            letter = match.group(1).upper()
            args, kwargs = [], {}
            inner = match.group(2)
            if inner is not None and inner.strip():
                for part in inner.split(","):
                    if "=" in part:
                        key, value = part.split("=", 1)
                        kwargs[key.strip()] = _parse_value(value, token)
                    else:
                        if kwargs:
                            raise ValueError(
                                f"Malformed layer {token!r}: positional after keyword argument."
                            )
                        if not part.strip():
                            raise ValueError(f"Malformed layer {token!r}: empty argument.")
                        args.append(_parse_value(part, token))
            layers.append(_make_layer(letter, args, kwargs, token))
    elif isinstance(spec, (list, tuple)):
        if len(spec) == 0:
            raise ValueError("The layer list is empty.")
        layers = []
        for item in spec:
            if isinstance(item, str):
                layers.extend(parse_layers(item))
            elif isinstance(item, tuple(_LAYER_TYPES.values())):
                if getattr(item, "in_shape", None) is not None and not isinstance(
                    item, LinearClassifier
                ):
                    item = type(item)(**_ctor_args(item))
                layers.append(copy.deepcopy(item))
            else:
                raise TypeError(
                    "Layer lists hold Folding, MaxPooling, ConvGMM, LinearClassifier "
                    f"objects or spec strings, got {type(item).__name__}."
                )
    else:
        raise TypeError(
            f"layers must be a string such as 'F(3,1)-G(25)' or a list of layers, got "
            f"{type(spec).__name__}."
        )
    n_clf = sum(isinstance(layer, LinearClassifier) for layer in layers)
    if n_clf > 1 or (n_clf == 1 and not isinstance(layers[-1], LinearClassifier)):
        raise ValueError(f"{spec!r}: a classifier C may only appear once, as the last layer.")
    if not any(isinstance(layer, ConvGMM) for layer in layers):
        raise ValueError(f"{spec!r}: the specification needs at least one G(K) layer.")
    if isinstance(layers[-1], (Folding, MaxPooling)) or (
        n_clf and isinstance(layers[-2], (Folding, MaxPooling))
    ):
        raise ValueError(f"{spec!r}: the last layer (before an optional C) must be a G layer.")
    return layers


def _ctor_args(layer):
    if isinstance(layer, ConvGMM):
        return {"n_components": layer.n_components, "shared": layer.shared}
    return {"kernel_size": layer.kernel_size, "stride": layer.stride}


def format_layers(layers):
    """The spec string of a list of layers (inverse of :func:`parse_layers`)."""
    return "-".join(repr(layer) for layer in layers)


# --------------------------------------------------------------------------- #
# the network                                                                 #


# --------------------------------------------------------------------------- #
# the network                                                                 #
# --------------------------------------------------------------------------- #
class DCGMMNet(nn.Module):
    """A built stack of DCGMM layers, with an optional classifier.

    Parameters
    ----------
    layers : list of nn.Module
        Output of :func:`parse_layers` (a last :class:`LinearClassifier` marks
        the classifier).
    input_shape : (int, int, int)
        ``(H, W, C)`` of the input images.
    n_classes : int, optional
        Number of classes: builds the classifier (on ``classifier_layers``).
    classifier_layers : sequence of int, default=(-1,)
        Indices of the ``G`` layers (bottom-up, negative from the top) whose
        flattened activities feed the classifier.
    dtype, device : torch dtype and device
    **gmm_options
        Keyword arguments of :meth:`ConvGMM.build` (``n_components`` is the
        number of components of the ``G`` layers that give none).

    Notes
    -----
    Build it with :func:`skdeepmix._torch_utils.build_module` (on the meta
    device) and initialise it with :meth:`reset_parameters`; off the meta
    device the layers initialise themselves (from torch's default generator
    unless ``generator`` is passed to :meth:`reset_parameters`).

    Training (see :meth:`training_losses` and :meth:`make_optimizer`) follows
    a schedule over ``total_steps`` optimizer steps (:meth:`set_schedule`):
    ``G`` layer ``g`` (0 at the bottom) starts after the fraction
    ``min(delay * g, 1)`` of them, and its smoothing width and learning rate
    anneal either geometrically over the fraction ``annealing`` of its
    remaining steps or, with ``annealing="plateau"``, by the reference
    code's plateau rule.
    """

    def __init__(self, layers, input_shape, *, n_classes=None, classifier_layers=(-1,),
                 dtype=None, device=None, **gmm_options):
        super().__init__()
        spec_classifier = layers[-1] if isinstance(layers[-1], LinearClassifier) else None
        layers = layers[:-1] if spec_classifier is not None else layers
        self.layers = nn.ModuleList(layers)
        self.input_shape = tuple(input_shape)
        self.shapes = [self.input_shape]
        shape = self.input_shape
        for layer in self.layers:
            if isinstance(layer, ConvGMM):
                shape = layer.build(shape, dtype=dtype, device=device, **gmm_options)
            else:
                shape = layer.build(shape, device=device)
            self.shapes.append(shape)
        self.gmm_indices = [i for i, l in enumerate(self.layers) if isinstance(l, ConvGMM)]
        top = self.shapes[-1]
        if top[0] != 1 or top[1] != 1:
            raise ValueError(
                f"The top G layer of {format_layers(self.layers)} has {top[0]}x{top[1]} "
                "positions; it must see the whole image (1x1). Add a folding layer "
                f"covering its input, e.g. '-F-G(K)' or 'F({self.shapes[-2][0]},1)'."
            )
        self.classifier = None
        self.classifier_layers = ()
        if n_classes is not None:
            self._build_classifier(spec_classifier, n_classes, classifier_layers, dtype, device)
        self.n_steps = 0
        self.input_offset, self.input_scale = 0.0, 1.0
        self.set_schedule(1, 0.0, 1.0)
        self.register_buffer("loss_sums_", torch.empty(len(self.gmm_indices) + 2, dtype=dtype,
                                                       device=device), persistent=False)

    def _build_classifier(self, spec_classifier, n_classes, classifier_layers, dtype, device):
        n_gmm = len(self.gmm_indices)
        chosen = []
        for g in classifier_layers:
            if isinstance(g, bool) or not isinstance(g, int) or not -n_gmm <= g < n_gmm:
                raise ValueError(
                    f"classifier_layers={tuple(classifier_layers)!r}: entries must be G-layer "
                    f"indices in [-{n_gmm}, {n_gmm - 1}] ({format_layers(self.layers)})."
                )
            chosen.append(self.gmm_indices[g % n_gmm])
        chosen = sorted(set(chosen))
        if spec_classifier is not None and spec_classifier.n_classes not in (None, n_classes):
            raise ValueError(
                f"The classifier layer C({spec_classifier.n_classes}) does not match the "
                f"{n_classes} classes in y."
            )
        self.classifier = LinearClassifier(n_classes)
        n_inputs = sum(math.prod(self.shapes[i + 1]) for i in chosen)
        self.classifier.build(n_inputs, n_classes, dtype=dtype, device=device)
        self.classifier_layers = tuple(chosen)

    def reset_parameters(self, generator=None):
        """Initialise every layer (and the classifier) from ``generator``."""
        for layer in self.layers:
            layer.reset_parameters(generator)
        if self.classifier is not None:
            self.classifier.reset_parameters(generator)
        self.n_steps = 0
        self.loss_sums_ = torch.zeros_like(self.loss_sums_)

    def set_input_range(self, low, high):
        """Map the inputs' range ``[low, high]`` to ``[0, 1]`` before the first layer.

        The layers' defaults (means initialised near 0, an absolute variance
        floor, the learning rates) suit data in ``[0, 1]``, as pixels / 255;
        with the map, data of any scale behave alike. Samples and in-painted
        values are mapped back, and the first ``G`` layer's log-likelihoods
        get the map's log-Jacobian, so they are densities of the inputs as given.
        """
        self.input_offset = float(low)
        self.input_scale = float(high - low) if high > low else 1.0

    def _normalize(self, x):
        if self.input_offset == 0.0 and self.input_scale == 1.0:
            return x
        return (x - self.input_offset) / self.input_scale

    def _log_jacobian(self):
        """Log-Jacobian of the input map per position of the first G layer."""
        return -self.shapes[self.gmm_indices[0]][2] * math.log(self.input_scale)

    @property
    def gmm_layers(self):
        return [self.layers[i] for i in self.gmm_indices]

    def n_parameters(self):
        """Free parameters of the G layers and the classifier."""
        n = sum(layer.n_parameters() for layer in self.gmm_layers)
        if self.classifier is not None:
            n += self.classifier.weight.numel() + self.classifier.bias.numel()
        return n

    def spec(self):
        """The built layers in the paper's notation (``"F(3,1)-G(25)-F-G(25)-C"``)."""
        return format_layers(self.layers) + ("-C" if self.classifier is not None else "")

    # ---------------------------------------------------------------- forward
    def forward_all(self, x, upto=None):
        """Run the forward mode; returns the per-layer outputs and G log-scores.

        Parameters
        ----------
        x : Tensor of shape (N, H, W, C)
        upto : int, optional
            Stop after layer index ``upto``.

        Returns
        -------
        outputs : list of Tensor
            ``outputs[i]`` is the output of layer ``i``.
        log_scores : dict {layer index: Tensor (N, H, W, K)}
        """
        outputs, log_scores = [], {}
        x = self._normalize(x)
        last = len(self.layers) - 1 if upto is None else upto
        for i, layer in enumerate(self.layers[: last + 1]):
            if isinstance(layer, ConvGMM):
                scores = layer.log_scores(x)
                log_scores[i] = scores
                x = torch.softmax(scores, dim=-1)
            else:
                x = layer(x)
            outputs.append(x)
        return outputs, log_scores

    def layer_log_likelihoods(self, x):
        """Max-component log-likelihood (mean over positions) of every G layer: (N, n_G)."""
        _, log_scores = self.forward_all(x)
        log_liks = torch.stack(
            [ConvGMM.max_log_likelihood(log_scores[i]) for i in self.gmm_indices], dim=1
        )
        log_liks[:, 0] += self._log_jacobian()
        return log_liks

    def log_prob_resp(self, x):
        """Top G layer's max-component log-likelihood (N,) and the log-posteriors
        of the classes (after a supervised fit) or of the top layer's components."""
        outputs, log_scores = self.forward_all(x)
        top = log_scores[self.gmm_indices[-1]]
        log_prob = ConvGMM.max_log_likelihood(top)
        if len(self.gmm_indices) == 1:
            log_prob = log_prob + self._log_jacobian()
        if self.classifier is not None:
            logits = self.classifier(self.classifier_features(outputs))
        else:
            logits = top.reshape(x.shape[0], -1)
        return log_prob, torch.log_softmax(logits, dim=1)

    def classifier_features(self, outputs):
        return torch.cat(
            [outputs[i].reshape(outputs[i].shape[0], -1) for i in self.classifier_layers], dim=1
        )

    def class_component_proba(self, x, y, n_classes):
        """Sums of the top layer's activities per class, (n_classes, K_top), and
        the class counts (n_classes,): ``p(top component | class)`` once divided."""
        top = self.gmm_indices[-1]
        acts = self.forward_all(x, upto=top)[0][top].reshape(x.shape[0], -1)
        sums = acts.new_zeros(n_classes, acts.shape[1]).index_add_(0, y, acts)
        counts = torch.bincount(y, minlength=n_classes).to(acts.dtype)
        return sums, counts

    # --------------------------------------------------------------- training
    def set_schedule(self, total_steps, delay, annealing):
        """Fix the schedule: ``total_steps`` steps in all, training delays and annealing.

        Parameters
        ----------
        total_steps : int
        delay : float
            G layer ``g`` (from the bottom) starts after ``min(delay * g, 1)``
            of the steps; the classifier with the highest layer it reads.
        annealing : float in (0, 1] or "plateau"
        """
        self.total_steps = max(int(total_steps), 1)
        self.starts = [min(delay * g, 1.0) for g in range(len(self.gmm_indices))]
        self.annealing = annealing

    def progress(self):
        """Fraction of the scheduled steps taken (above 1 after a warm start)."""
        return self.n_steps / self.total_steps

    def active_layers(self):
        """Per G layer (bottom-up): whether its training delay is over."""
        progress = self.progress()
        return [progress >= start for start in self.starts]

    def classifier_active(self):
        g = max(self.gmm_indices.index(i) for i in self.classifier_layers)
        return self.progress() >= self.starts[g]

    def annealing_done(self):
        """Whether every G layer trains with its final smoothing width and learning rate."""
        if self.annealing == "plateau":
            return all(layer.sigma <= layer.sigma_min for layer in self.gmm_layers)
        return all(self.progress() >= start + self.annealing * (1.0 - start)
                   for start in self.starts)

    def training_losses(self, x, y=None):
        """Per-sample training losses of a mini-batch (lower is better).

        The sum over the G layers of how far their smoothed log-likelihood
        lies below the largest one the variance floor allows
        (:meth:`ConvGMM.log_density_bound`; a constant, so the gradient is that
        of the negative log-likelihood, but the loss is non-negative and its
        size measures the fit, which the divergence check of the training
        loop compares: a log-likelihood can sit near 0), each computed on its
        *detached* input (so each layer's gradient is that of
        its own loss: no back-propagation between layers, as in the paper;
        layers still in their delay contribute values without gradients),
        plus the classifier's cross-entropy on the detached activities it
        reads, divided by their mean squared norm (a normalised step: the same
        ``classifier_learning_rate`` suits one or many input positions).
        Every layer's log-likelihood and the cross-entropy are accumulated in
        the ``loss_sums_`` buffer, on the device (no host sync).

        Parameters
        ----------
        x : Tensor of shape (N, H, W, C)
        y : LongTensor of shape (N,), optional
            Class indices (trains the classifier).

        Returns
        -------
        losses : Tensor of shape (N,)
        """
        active = self.active_layers()
        x = self._normalize(x)
        losses, sums, outputs, g = [], [], [], 0
        for layer in self.layers:
            if isinstance(layer, ConvGMM):
                with torch.set_grad_enabled(active[g] and torch.is_grad_enabled()):
                    log_lik, scores = layer.training_log_likelihood(x)  # (N,), (N, H, W, K)
                losses.append(layer.log_density_bound() - log_lik)
                if active[g] and self.annealing == "plateau":
                    layer.window_loss_ += log_lik.detach().mean()
                sums.append(log_lik.detach().sum())
                x = torch.softmax(scores, dim=-1)
                g += 1
            else:
                x = layer(x)
            outputs.append(x)
        cross_entropy = None
        if y is not None and self.classifier is not None and self.classifier_active():
            features = self.classifier_features(outputs)
            ce = nn.functional.cross_entropy(self.classifier(features), y, reduction="none")
            losses.append(ce / features.square().sum(1).mean().clamp_min(1e-3))
            cross_entropy = ce.detach().sum()
        sums.append(cross_entropy if cross_entropy is not None else sums[-1].new_zeros(()))
        sums.append(sums[-1].new_tensor(float(x.shape[0])))
        self.loss_sums_ += torch.stack(sums)
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum(dim=0)

    def make_optimizer(self, learning_rate_factors, classifier_learning_rate, reduce=None):
        """Plain SGD over every G layer (and the classifier), as the reference code.

        One parameter group per layer and parameter kind (means, square-root
        precisions, weight logits) with learning rate
        ``layer learning rate * factor`` (see :meth:`ConvGMM.parameter_groups`),
        and one for the classifier. A post-step hook (:meth:`after_step`)
        projects the precisions, advances the schedule and sets the groups'
        learning rates for the next step.

        Parameters
        ----------
        learning_rate_factors : (float, float, float)
        classifier_learning_rate : float
        reduce : callable, optional
            Sums a Python float over the processes (plateau annealing under
            torch.distributed).

        Returns
        -------
        optimizer : torch.optim.SGD
        """
        groups = []
        for layer in self.gmm_layers:
            groups += layer.parameter_groups(learning_rate_factors)
        if self.classifier is not None:
            groups.append({"params": list(self.classifier.parameters()),
                           "lr": float(classifier_learning_rate)})
        optimizer = torch.optim.SGD(groups, lr=float(classifier_learning_rate))
        self._apply_schedule(optimizer)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step(opt, reduce))
        return optimizer

    def after_step(self, optimizer, reduce=None):
        """Post-step hook: precision projection, step counts, annealing, learning rates."""
        active = self.active_layers()
        for layer, is_active in zip(self.gmm_layers, active):
            layer.project_()
            if is_active:
                layer.n_updates += 1
                if self.annealing == "plateau":
                    layer.end_window_step(reduce)
        self.n_steps += 1
        self._apply_schedule(optimizer)

    def _apply_schedule(self, optimizer):
        if self.annealing != "plateau":
            progress = self.progress()
            for layer, start in zip(self.gmm_layers, self.starts):
                if progress >= start:
                    span = max(self.annealing * (1.0 - start), 1e-12)
                    layer.set_annealing((progress - start) / span)
        for group in optimizer.param_groups:
            layer = group.get("dcgmm_layer")
            if layer is not None:
                group["lr"] = layer.group_learning_rate(group["factor"])

    # --------------------------------------------------------------- sampling
    def _sharpen(self, index, x, target, iterations, rate, fixed=None):
        """Gradient ascent on the input of layer ``index`` towards G layer ``target``.

        The step is ``rate`` divided by the largest curvature of the target's
        loss with respect to one input element (largest precision x overlaps /
        positions), so that ``rate < 2`` is stable.
        """
        target_layer = self.layers[target]
        overlap = 1.0
        for layer in self.layers[index:target]:
            if isinstance(layer, (Folding, MaxPooling)):
                overlap *= layer.max_overlap
        step = rate * target_layer.n_positions / (target_layer.max_precision * overlap)
        x = x.detach().clone()
        if fixed is not None:
            known_mask, known_values = fixed
            x = torch.where(known_mask, known_values, x)
        with torch.enable_grad():
            for _ in range(iterations):
                x.requires_grad_(True)
                h = x
                for layer in self.layers[index:target]:
                    h = layer(h)
                objective = ConvGMM.max_log_likelihood(target_layer.log_scores(h)).sum()
                (grad,) = torch.autograd.grad(objective, x)
                with torch.no_grad():
                    x = x + step * grad
                    if fixed is not None:
                        x = torch.where(known_mask, known_values, x)
        return x.detach()

    def backwards(self, start, control, *, generator=None, n_samples=None, top_s=3,
                  sampling_divisor=20.0, sharpening_iter=0, sharpening_rate=0.5,
                  fixed=None):
        """Run the backward (sampling) mode from layer ``start`` down to the input.

        Parameters
        ----------
        start : int
            Index of a G layer to start from.
        top_s : int or sequence of int
            Top-S selection, for all G layers or per G layer (bottom-up).
        control : Tensor of shape (N, H, W, K) or None
            Control signal for layer ``start`` (``None``: its mixture weights).
        sharpening_iter, sharpening_rate
            Gradient sharpening after every folding/pooling layer, towards the
            next G layer above it.
        fixed : (BoolTensor, Tensor) of shape (N, H, W, C), optional
            Input elements kept fixed (in-painting).

        Returns
        -------
        x : Tensor of shape (N, H, W, C)
        top_components : LongTensor of shape (N,)
            Component drawn by the starting layer (at its first position).
        """
        t = control
        top_components = None
        if fixed is not None:
            fixed = (fixed[0], self._normalize(fixed[1]))
        if isinstance(top_s, (list, tuple)):
            per_layer = dict(zip(self.gmm_indices, top_s))
        else:
            per_layer = dict.fromkeys(self.gmm_indices, top_s)
        for i in range(start, -1, -1):
            layer = self.layers[i]
            if isinstance(layer, ConvGMM):
                t, z = layer.backwards(t, generator=generator, top_s=per_layer[i],
                                       sampling_divisor=sampling_divisor, n_samples=n_samples)
                if top_components is None:
                    top_components = z.reshape(z.shape[0], -1)[:, 0]
            else:
                t = layer.backwards(t)
                if sharpening_iter > 0:
                    target = next(j for j in self.gmm_indices if j > i)
                    t = self._sharpen(i, t, target, sharpening_iter, sharpening_rate,
                                      fixed=fixed if i == 0 else None)
        if fixed is not None:
            t = torch.where(fixed[0], fixed[1], t)
        return t * self.input_scale + self.input_offset, top_components
