"""Gaussian-mixture variational auto-encoder (GMVAE) modules.

Generative model::

    y ~ Cat(pi),   z | y ~ N(mu_y, Sigma_y),   x | z ~ Bernoulli / Gaussian(decoder(z))

Inference model::

    h = encoder(x)
    q(z | x, y) = N(m(h[, y]), diag(s(h[, y])))
    q(y | x)    = Cat(softmax(l(x)))

with two ways of building the cluster logits ``l(x)``:

* ``z_given_y=False`` (default): ``q(z|x,y) = q(z|x)`` and
  ``l(x) = E[log pi_y] + E_{q(z|x)} E[log p(z|y)] + r(h)``: the logits are the
  posterior of the mixture prior at the encoder's Gaussian (the mean-field
  optimum of the ELBO in ``q(y|x)``, as in VaDE) plus a learned residual ``r``
  (a linear head initialised at zero). This makes the prior's parameters
  enter ``q(y|x)`` directly and keeps cluster identities consistent with the
  prior, so closed-form prior updates are stable.
* ``z_given_y=True``: the classic GMVAE of Dilokthanakul et al. (2016):
  ``l(x) = r(h)`` is a classifier head and ``q(z|x,y)`` takes the (relaxed) ``y``
  as an input.

``y`` is sampled with the Gumbel-softmax (soft, or straight-through hard)
relaxation at temperature ``tau`` (annealed by the estimator), or
marginalised exactly (``gumbel='none'``), which is cheap here because the
decoder does not depend on ``y``.

The prior ``p(z|y) p(y)`` is any object with ``expected_log_prob(m, v)``
(``(n, K)``), ``log_weights()`` (``(K,)``), ``weights()``, ``point_log_prob(z)``,
``means``, ``precisions_cholesky`` and ``covariance_type``; see
:class:`GaussianMixturePrior` (learnable fixed-K prior) and
:class:`~skdeepmix.nn.dpgmm.DirichletProcessGMM` (variational DP prior).

Statistics of the latent codes are summed over all the rows, also when the
rows are split over ``torch.distributed`` processes (``partition``, see
:class:`~skdeepmix._distributed.RowPartition`; ``None`` means all rows are
here): :func:`column_moments` and the initialisation of the fixed-K prior
(:func:`init_mixture_prior`); the DP prior's own methods take a ``partition``.
"""


from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._gaussian import LOG_2PI, SufficientStatistics, log_gaussian_prob, sample_gaussian
from .._torch_utils import init_layers_

__all__ = [
    "GMVAE",
    "GaussianMixturePrior",
    "gumbel_softmax",
    "negative_elbo",
    "pretrain_loss",
    "importance_weighted_log_likelihood",
    "sample",
    "column_moments",
    "init_mixture_prior",
]


def _mlp(sizes, activation):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers)


def gumbel_softmax(logits, tau, generator, hard=False):
    """Gumbel-softmax sample (Jang et al. 2017) with an explicit generator.

    Parameters
    ----------
    logits : Tensor of shape (n, K)
    tau : float
        Temperature.
    generator : torch.Generator
    hard : bool, default=False
        Straight-through: one-hot forward pass, soft gradient.

    Returns
    -------
    y : Tensor of shape (n, K)
    """
    u = torch.rand(logits.shape, generator=generator, device=generator.device)
    u = u.to(device=logits.device, dtype=logits.dtype).clamp(1e-10, 1.0 - 1e-7)
    soft = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
    if not hard:
        return soft
    index = soft.argmax(-1)
    one_hot = F.one_hot(index, logits.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft


class GaussianMixturePrior(nn.Module):
    """Learnable fixed-K diagonal Gaussian mixture prior with uniform weights.

    Parameters
    ----------
    n_components : int
    latent_dim : int
    """

    covariance_type = "diag"

    def __init__(self, n_components, latent_dim):
        super().__init__()
        self.n_components = n_components
        self.means = nn.Parameter(torch.empty(n_components, latent_dim))
        self.log_vars = nn.Parameter(torch.empty(n_components, latent_dim))

    def reset_parameters(self, generator=None):
        """Standard-normal components at the origin (set from data by
        :func:`init_mixture_prior`)."""
        with torch.no_grad():
            self.means.zero_()
            self.log_vars.zero_()

    @property
    def covariances(self):
        return self.log_vars.exp()

    @property
    def precisions_cholesky(self):
        return torch.exp(-0.5 * self.log_vars)

    def log_weights(self):
        return self.means.new_full((self.n_components,), -math.log(self.n_components))

    def weights(self):
        return self.log_weights().exp()

    def expected_log_prob(self, m, v=None):
        """``E_{N(z; m, diag v)}[log N(z | mu_k, diag sigma_k^2)]``, shape (n, K)."""
        return log_gaussian_prob(m, self.means, self.precisions_cholesky, "diag", X_var=v)

    def point_log_prob(self, z):
        return self.expected_log_prob(z) + self.log_weights()


class GMVAE(nn.Module):
    """GMVAE networks: MLP encoder, cluster head, latent head and decoder.

    Inputs are standardised before the encoder, ``(x - shift) / scale``
    (buffers set by :meth:`set_input_scaling`; identity by default). With the
    Gaussian likelihood the decoder models the standardised data and
    :meth:`log_likelihood` / :meth:`mean` map back to the data's units, so any
    scale of the data trains like unit-scale data.

    Parameters
    ----------
    n_features : int
    latent_dim : int
    n_components : int
    encoder_sizes : sequence of int, default=(256, 256)
    decoder_sizes : sequence of int, default=(256, 256)
    likelihood : {'bernoulli', 'gaussian'}, default='bernoulli'
    z_given_y : bool, default=False
        Let ``q(z|x,y)`` depend on ``y`` (classic GMVAE); see the module docstring.

    Examples
    --------
    >>> import torch
    >>> from skdeepmix._torch_utils import build_module
    >>> g = torch.Generator().manual_seed(0)
    >>> net = build_module(lambda: GMVAE(784, 10, 20, (64,), (64,)), g, "cpu", torch.float32)
    >>> h = net.encode(torch.rand(5, 784))
    >>> m, logv = net.q_z(h)
    >>> net.decode(m).shape
    torch.Size([5, 784])
    """

    def __init__(
        self,
        n_features,
        latent_dim,
        n_components,
        encoder_sizes=(256, 256),
        decoder_sizes=(256, 256),
        likelihood="bernoulli",
        z_given_y=False,
    ):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}.")
        self.likelihood = likelihood
        self.z_given_y = bool(z_given_y)
        self.n_components = n_components
        self.latent_dim = latent_dim
        enc = [n_features, *encoder_sizes]
        self.encoder = _mlp(enc, nn.ReLU)
        h_dim = enc[-1]
        self.y_head = nn.Linear(h_dim, n_components)
        self.z_head = nn.Linear(h_dim + (n_components if self.z_given_y else 0), 2 * latent_dim)
        dec = [latent_dim, *decoder_sizes]
        self.decoder = nn.Sequential(_mlp(dec, nn.ReLU), nn.Linear(dec[-1], n_features))
        self.log_scale = nn.Parameter(torch.empty(n_features))
        self.register_buffer("shift", torch.empty(n_features))
        self.register_buffer("scale", torch.empty(()))

    def reset_parameters(self, generator):
        """torch's default layer initialisation drawn from ``generator``; the
        residual cluster head starts at zero (``z_given_y=False``: ``q(y|x)``
        starts as the prior posterior), unit decoder scale, no input scaling."""
        init_layers_(self, generator)
        with torch.no_grad():
            if not self.z_given_y:
                self.y_head.weight.zero_()
                self.y_head.bias.zero_()
            self.log_scale.zero_()
            self.shift.zero_()
            self.scale.fill_(1.0)

    def set_input_scaling(self, shift, scale):
        """Standardise inputs by ``(x - shift) / scale`` (scale: a scalar)."""
        with torch.no_grad():
            self.shift.copy_(shift)
            self.scale.copy_(scale)

    def fit_noise_scale(self, squared_residuals):
        """Set the Gaussian decoder's per-feature scale to the root mean squared
        residuals (of the standardised data), e.g. those of the pre-trained
        auto-encoder, so that the ELBO starts with a reconstruction term of the
        right weight whatever the data's units."""
        with torch.no_grad():
            floor = torch.finfo(squared_residuals.dtype).tiny
            self.log_scale.copy_(0.5 * torch.log(squared_residuals.clamp_min(floor)))

    def squared_residuals(self, x):
        """Squared residuals of the standardised data at the decoded code means
        (the Gaussian decoder's errors), shape (n, n_features)."""
        return ((x - self.shift) / self.scale - self.decode(self.code_means(x))).square()

    def set_code_variance(self, variance):
        """Start ``q(z|x)`` with the variances ``variance`` (shape (latent_dim,))
        for every ``x``: the pre-trained auto-encoder only trained the means."""
        with torch.no_grad():
            d = self.latent_dim
            self.z_head.weight[d:].zero_()
            self.z_head.bias[d:].copy_(torch.log(variance))

    def code_means(self, x):
        """Means of ``q(z|x)`` (with a uniform ``y`` when ``z_given_y``): the
        auto-encoder's codes, shape (n, latent_dim)."""
        h = self.encode(x)
        y = None
        if self.z_given_y:
            y = x.new_full((x.shape[0], self.n_components), 1.0 / self.n_components)
        return self.q_z(h, y)[0]

    def encode(self, x):
        """Encoder features ``h`` of shape (n, h_dim)."""
        return self.encoder((x - self.shift) / self.scale)

    def q_z(self, h, y=None):
        """Mean and log-variance of ``q(z|x[,y])``, each of shape (n, latent_dim)."""
        if self.z_given_y:
            if y is None:
                raise ValueError("q(z|x,y) needs y when z_given_y=True.")
            h = torch.cat([h, y], dim=-1)
        m, logv = self.z_head(h).chunk(2, dim=-1)
        return m, logv.clamp(-12.0, 8.0)

    def decode(self, z):
        """Decoder output (Bernoulli logits, or Gaussian means of the
        standardised data), shape (n, n_features)."""
        return self.decoder(z)

    def mean(self, out):
        """Mean of ``p(x|z)`` (in the data's units) from the decoder output."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(out)
        return out * self.scale + self.shift

    def log_likelihood(self, x, out):
        """``log p(x|z)`` summed over features, shape (n,)."""
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        # N(x; mean(out), diag (scale * sigma)^2): the residual under N(0, sigma^2)
        residual = (x - self.shift) / self.scale - out
        precision_cholesky = torch.exp(-self.log_scale.clamp(-7.0, 5.0))[None]
        log_prob = log_gaussian_prob(residual, residual.new_zeros(precision_cholesky.shape),
                                     precision_cholesky, "diag")[:, 0]
        return log_prob - x.shape[-1] * torch.log(self.scale)

    def cluster_logits(self, h, prior, m=None, v=None):
        """Logits of ``q(y|x)`` of shape (n, K) (see the module docstring)."""
        residual = self.y_head(h)
        if self.z_given_y:
            return residual
        return prior.expected_log_prob(m, v) + prior.log_weights() + residual

    def infer(self, x, prior):
        """Deterministic inference: ``(m, v, log q(y|x))`` for ``x``.

        For ``z_given_y=True`` the latent moments are those of ``q(z|x,y)`` at
        the soft ``y = q(y|x)``.
        """
        h = self.encode(x)
        if self.z_given_y:
            log_qy = F.log_softmax(self.cluster_logits(h, prior), -1)
            m, logv = self.q_z(h, log_qy.exp())
        else:
            m, logv = self.q_z(h)
            log_qy = F.log_softmax(self.cluster_logits(h, prior, m, logv.exp()), -1)
        return m, logv.exp(), log_qy


def negative_elbo(model, prior, x, generator, tau=1.0, gumbel="soft", beta=1.0):
    """Per-sample negative ELBO of the GMVAE, shape (n,).

    ``-ELBO = -E[log p(x|z)] + E_{q(y|x)}[KL(q(z|x,y) || p(z|y))] + KL(q(y|x) || p(y))``,
    where the prior terms are expectations under the prior's (variational)
    posterior, and the expectation over ``y`` is estimated with a Gumbel-softmax
    sample (``gumbel='soft'|'hard'``) or computed exactly (``'none'``).

    Parameters
    ----------
    model : GMVAE
    prior : prior module (see the module docstring)
    x : Tensor of shape (n, n_features)
    generator : torch.Generator
    tau : float, default=1.0
    gumbel : {'soft', 'hard', 'none'}, default='soft'
    beta : float, default=1.0
        Weight of the KL terms.
    """
    h = model.encode(x)
    log_weights = prior.log_weights()
    if model.z_given_y:
        logits = model.cluster_logits(h, prior)
        log_qy = F.log_softmax(logits, -1)
        w = log_qy.exp() if gumbel == "none" else gumbel_softmax(
            logits, tau, generator, hard=gumbel == "hard")
        m, logv = model.q_z(h, w)
        v = logv.exp()
        elp = prior.expected_log_prob(m, v)
    else:
        m, logv = model.q_z(h)
        v = logv.exp()
        elp = prior.expected_log_prob(m, v)
        logits = elp + log_weights + model.y_head(h)
        log_qy = F.log_softmax(logits, -1)
        w = log_qy.exp() if gumbel == "none" else gumbel_softmax(
            logits, tau, generator, hard=gumbel == "hard")
    eps = torch.randn(m.shape, generator=generator, device=generator.device, dtype=m.dtype)
    z = m + v.sqrt() * eps
    rec = model.log_likelihood(x, model.decode(z))
    entropy_z = 0.5 * (logv + 1.0 + LOG_2PI).sum(-1)
    cross_z = -(w * elp).sum(-1)
    kl_y = (log_qy.exp() * (log_qy - log_weights)).sum(-1)
    return -rec + beta * (cross_z - entropy_z + kl_y)


def pretrain_loss(model, x):
    """Auto-encoder reconstruction loss (VaDE-style pre-training), shape (n,)."""
    return -model.log_likelihood(x, model.decode(model.code_means(x)))


def importance_weighted_log_likelihood(model, prior, x, m, v, eps):
    """Importance-weighted estimate of ``log p(x)`` (Burda et al. 2016), shape (n,).

    ``log p(x) ~= log 1/S sum_s p(x|z_s) p(z_s) / q(z_s|x)`` with
    ``z_s = m + sqrt(v) eps_s`` drawn from the encoder's Gaussian
    ``q(z|x) = N(m, diag v)`` and ``p(z)`` the prior mixture at its point
    estimates. ``eps`` of shape (S, latent_dim) are standard-normal draws
    shared by all rows, so that each row's estimate depends on that row only.
    """
    n, S = x.shape[0], eps.shape[0]
    std = v.sqrt()
    z = m[:, None, :] + std[:, None, :] * eps[None, :, :]  # (n, S, d)
    # log N(z_s; m, diag v) = log N(eps_s; 0, I) - sum log std
    standard = log_gaussian_prob(eps, eps.new_zeros(1, eps.shape[1]),
                                 eps.new_ones(1, eps.shape[1]), "diag")[:, 0]
    log_q = standard[None, :] - torch.log(std).sum(-1)[:, None]
    flat = z.reshape(n * S, -1)
    log_pz = torch.logsumexp(prior.point_log_prob(flat), -1).reshape(n, S)
    log_px = model.log_likelihood(x.repeat_interleave(S, 0), model.decode(flat)).reshape(n, S)
    return torch.logsumexp(log_px + log_pz - log_q, 1) - math.log(S)


def sample(model, prior, n_samples, generator, active_threshold=0.0):
    """Draw ``y ~ pi``, ``z ~ p(z|y)``, ``x`` = the decoder mean.

    Clusters are drawn among those whose weight exceeds ``active_threshold``
    (renormalised), so that the truncated tail of a stick-breaking prior does
    not produce off-data samples.

    Returns
    -------
    X : Tensor of shape (n_samples, n_features)
    y : LongTensor of shape (n_samples,)
    """
    weights = prior.weights()
    active = weights > active_threshold
    if bool(active.any()):
        weights = torch.where(active, weights, torch.zeros_like(weights))
    y = torch.multinomial(weights.to(generator.device), n_samples, replacement=True,
                          generator=generator).to(weights.device)
    z = sample_gaussian(prior.means, prior.precisions_cholesky, prior.covariance_type, y,
                        generator)
    return model.mean(model.decode(z)), y


# ----------------------------------------------------------------------
# fitting a prior to latent codes, from statistics over all processes' rows
def _reduce(partition, *tensors):
    if partition is not None:
        partition.sum(*tensors)
    return tensors


def _n_total(partition, n_local):
    return n_local if partition is None else partition.n_total


def column_moments(x, partition=None):
    """Mean and (biased) variance of every column over all processes' rows."""
    n = _n_total(partition, x.shape[0])
    (total,) = _reduce(partition, x.sum(0))
    mean = total / n
    (scatter,) = _reduce(partition, (x - mean).square().sum(0))
    return mean, scatter / n


@torch.no_grad()
def init_mixture_prior(prior, m, v, labels, partition=None):
    """Initialise a :class:`GaussianMixturePrior` from hard labels of the codes:
    each component's mean and per-dimension variance (plus the mean code
    variance; the overall variance for components with at most one code)."""
    K, d = prior.n_components, m.shape[1]
    stats = SufficientStatistics("diag", m.new_zeros(K, d), m.new_zeros(d))
    counts, means, variances = stats.accumulate(
        lambda exact: [dict(X=m, resp=F.one_hot(labels, K).to(m.dtype))], 0.0, partition)
    _, overall = column_moments(m, partition)
    n = _n_total(partition, m.shape[0])
    (v_total,) = _reduce(partition, v.sum(0))
    var = torch.where(counts[:, None] > 1, variances, overall)
    prior.means.copy_(means)
    prior.log_vars.copy_(torch.log(var + v_total / n + 1e-4))
