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
(``(n, K)``), ``log_weights()`` (``(K,)``) and ``point_log_prob(z)``; see
:class:`GaussianMixturePrior` (learnable fixed-K prior) and
:class:`~skdeepmix.nn.dpgmm.DirichletProcessGMM` (variational DP prior).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GMVAE",
    "GaussianMixturePrior",
    "gumbel_softmax",
    "negative_elbo",
    "pretrain_loss",
    "importance_weighted_log_likelihood",
]

_LOG_2PI = math.log(2 * math.pi)


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

    def __init__(self, n_components, latent_dim):
        super().__init__()
        self.n_components = n_components
        self.means = nn.Parameter(torch.zeros(n_components, latent_dim))
        self.log_vars = nn.Parameter(torch.zeros(n_components, latent_dim))

    @property
    def covariances(self):
        return self.log_vars.exp()

    def log_weights(self):
        return self.means.new_full((self.n_components,), -math.log(self.n_components))

    def weights(self):
        return self.log_weights().exp()

    def expected_log_prob(self, m, v=None):
        """``E_{N(z; m, diag v)}[log N(z | mu_k, diag sigma_k^2)]``, shape (n, K)."""
        lv = self.log_vars
        inv = torch.exp(-lv)
        sq = (m**2) @ inv.T - 2 * m @ (self.means * inv).T + ((self.means**2) * inv).sum(1)
        if v is not None:
            sq = sq + v @ inv.T
        return -0.5 * (m.shape[1] * _LOG_2PI + lv.sum(1) + sq)

    def point_log_prob(self, z):
        return self.expected_log_prob(z) + self.log_weights()


class GMVAE(nn.Module):
    """GMVAE networks: MLP encoder, cluster head, latent head and decoder.

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
    >>> net = GMVAE(784, 10, 20, (64,), (64,))
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
        self.log_scale = nn.Parameter(torch.zeros(n_features))
        if not self.z_given_y:
            # residual head starts at zero: q(y|x) starts as the prior posterior
            nn.init.zeros_(self.y_head.weight)
            nn.init.zeros_(self.y_head.bias)

    def encode(self, x):
        """Encoder features ``h`` of shape (n, h_dim)."""
        return self.encoder(x)

    def q_z(self, h, y=None):
        """Mean and log-variance of ``q(z|x[,y])``, each of shape (n, latent_dim)."""
        if self.z_given_y:
            if y is None:
                raise ValueError("q(z|x,y) needs y when z_given_y=True.")
            h = torch.cat([h, y], dim=-1)
        m, logv = self.z_head(h).chunk(2, dim=-1)
        return m, logv.clamp(-12.0, 8.0)

    def decode(self, z):
        """Decoder output (Bernoulli logits or Gaussian means), shape (n, n_features)."""
        return self.decoder(z)

    def mean(self, out):
        """Mean of ``p(x|z)`` from the decoder output."""
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def log_likelihood(self, x, out):
        """``log p(x|z)`` summed over features, shape (n,)."""
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        log_scale = self.log_scale.clamp(-7.0, 5.0)
        return -0.5 * (((x - out) * torch.exp(-log_scale)) ** 2 + 2 * log_scale + _LOG_2PI).sum(-1)

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
    if model.z_given_y:
        logits = model.cluster_logits(h, prior)
        log_qy = F.log_softmax(logits, -1)
        if gumbel == "none":
            w = log_qy.exp()
        else:
            w = gumbel_softmax(logits, tau, generator, hard=gumbel == "hard")
        m, logv = model.q_z(h, w)
        v = logv.exp()
        elp = prior.expected_log_prob(m, v)
    else:
        m, logv = model.q_z(h)
        v = logv.exp()
        elp = prior.expected_log_prob(m, v)
        logits = elp + prior.log_weights() + model.y_head(h)
        log_qy = F.log_softmax(logits, -1)
        if gumbel == "none":
            w = log_qy.exp()
        else:
            w = gumbel_softmax(logits, tau, generator, hard=gumbel == "hard")
    eps = torch.randn(m.shape, generator=generator, device=generator.device).to(m)
    z = m + v.sqrt() * eps
    rec = model.log_likelihood(x, model.decode(z))
    entropy_z = 0.5 * (logv + 1.0 + _LOG_2PI).sum(-1)
    cross_z = -(w * elp).sum(-1)
    kl_y = (log_qy.exp() * (log_qy - prior.log_weights())).sum(-1)
    return -rec + beta * (cross_z - entropy_z + kl_y)


def pretrain_loss(model, x):
    """Auto-encoder reconstruction loss (VaDE-style pre-training), shape (n,)."""
    h = model.encode(x)
    if model.z_given_y:
        y = x.new_full((x.shape[0], model.n_components), 1.0 / model.n_components)
        m, _ = model.q_z(h, y)
    else:
        m, _ = model.q_z(h)
    return -model.log_likelihood(x, model.decode(m))


def importance_weighted_log_likelihood(model, prior, x, eps):
    """Importance-weighted estimate of ``log p(x)`` (Burda et al. 2016), shape (n,).

    ``log p(x) ~= log 1/S sum_s p(x|z_s) p(z_s) / q(z_s|x)`` with ``z_s`` drawn
    from the encoder's Gaussian and ``p(z)`` the prior mixture at its point
    estimates. ``eps`` of shape (S, latent_dim) are standard-normal draws shared
    by all rows (so that each row's estimate depends on that row only).
    """
    m, v, _ = model.infer(x, prior)
    std = v.sqrt()
    n, S = x.shape[0], eps.shape[0]
    z = m[:, None, :] + std[:, None, :] * eps[None, :, :]  # (n, S, d)
    log_q = -0.5 * (eps**2 + _LOG_2PI).sum(-1)[None, :] - torch.log(std).sum(-1)[:, None]
    flat = z.reshape(n * S, -1)
    log_pz = torch.logsumexp(prior.point_log_prob(flat), -1).reshape(n, S)
    out = model.decode(flat)
    log_px = model.log_likelihood(x.repeat_interleave(S, 0), out).reshape(n, S)
    return torch.logsumexp(log_px + log_pz - log_q, 1) - math.log(S)
