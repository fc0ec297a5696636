"""Deep convolutional Gaussian mixture model (DCGMM) estimator."""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _distributed
from ._base import BaseDeepMixture
from ._docstrings import fill_doc
from ._torch_utils import build_module, make_generator, to_numpy, to_tensor
from ._train import count_batches, train_epoch
from .nn.dcgmm import DCGMMNet, parse_layers

__all__ = ["DCGMMEstimator"]


@fill_doc(
    tol=1e-2,
    max_iter=20,
    iteration="epochs",
    tol_meaning=(
        "Training stops once the smoothing and learning-rate annealing is over and "
        "the top G layer's log-likelihood, averaged over 3 epochs, improves by less "
        "than ``tol`` times its improvement since the first 3 epochs (see "
        "``_converged``)."
    ),
)
class DCGMMEstimator(BaseDeepMixture):
    """Deep convolutional Gaussian mixture model (Gepperth, DCGMM).

    A CNN-like stack of convolutional GMM layers ``G(K)``, folding
    (half-convolution) layers ``F(f, stride)``, max-pooling layers
    ``P(f, stride)`` and an optional linear classifier ``C``. Every ``G``
    layer is a diagonal-precision GMM applied at every position of its input
    whose activities (posteriors) feed the next layer; each ``G`` layer is
    trained by plain SGD on its *own* max-component log-likelihood (no
    back-propagation between layers), smoothed over a toroidal grid of
    components with an annealed Gaussian kernel, as in the author's reference
    code. Sampling runs the layers backwards (hierarchical control signals,
    top-S selection, gradient sharpening); in-painting is a forward pass to the
    top ``G`` layer followed by a backward pass.

    The defaults (``"F-G"``: one diagonal GMM of the whole input with 100
    components, variance floor 0.01) were chosen by validation across the
    leave-one-class-out outlier-detection tasks of MNIST and digits (see
    ``benchmarks/results/defaults_dcgmm.md``).

    The reference code's settings suit data in ``[0, 1]`` (pixels / 255), so
    the range ``[min(X), max(X)]`` of the training data (over all features)
    is mapped to ``[0, 1]`` before the first layer (data already in ``[0, 1]``
    with both ends attained are unchanged): ``mu_init`` and ``min_variance``
    refer to the mapped data. Scores are log-densities of the data as given
    (the map's log-Jacobian is added), samples are mapped back.

    Parameters
    ----------
    layers : str or list, default="F-G"
        Layer specification in the paper's notation, layers joined by ``-``,
        e.g. ``"F(3,1)-G(25)-F(4,2)-G(25)-F(12,1)-G(25)"`` (DCGMM-E on 28x28
        images) or ``"F(28,2)-G(25)"`` (DCGMM-A). ``F`` without arguments
        folds the whole input into one position, so the default ``"F-G"`` is
        DCGMM-A (a diagonal GMM of the whole image, trained by SGD) for any
        input; ``G`` without ``K`` has ``n_components`` components;
        ``G(K, shared=False)`` gives every position its own parameters; a last
        ``C`` marks the classifier (one is added automatically when ``fit``
        gets ``y``). A list of layer objects from :mod:`skdeepmix.nn.dcgmm` is
        accepted too. The top ``G`` layer must have a single (1x1) position.
    n_components : int, default=100
        Number of components of every ``G`` layer whose specification gives
        none (an explicit ``G(49)`` wins).
    image_shape : tuple of int, optional
        ``(H, W)`` or ``(H, W, C)`` of flat inputs of shape ``(n, H*W*C)``
        (pixels in row-major order, channels last). Not needed for
        image-shaped inputs ``(n, H, W)`` / ``(n, H, W, C)``; flat inputs
        without it are a single position with ``n_features`` channels.
    batch_size : int, default=100
        Mini-batch size (reference code: 100).
    learning_rate : float, default=0.015
        Initial SGD learning rate of the ``G`` layers, annealed with the
        smoothing width down to ``min_learning_rate`` (the reference code uses
        0.011 -> 0.01 with ``min_variance=0.05`` over 40-80 epochs). Keep
        ``learning_rate / min_variance`` below 2 (better 1.5): a plain
        gradient step on the means of a component that wins every row has
        curvature up to ``1 / min_variance``, and larger steps diverge for
        small ``n_components``.
    min_learning_rate : float, default=0.01
        Final learning rate of the ``G`` layers (at most ``learning_rate``).
    learning_rate_factors : tuple of 3 float, default=(1.0, 0.1, 0.2)
        Learning-rate factors of the means, the variances (parameterised by
        square-root precisions) and the weights (logits); 0 freezes a kind.
    min_variance : float, default=0.01
        Variance floor of the ``G`` layers: after every step the square-root
        precisions are projected to at most ``1/sqrt(min_variance)`` (the
        reference code uses 0.05, a precision bound of 20); also the initial
        variance. With the defaults' learning rates it sets the step size
        (see ``learning_rate``).
    mu_init : float, default=0.1
        Means are initialised uniformly in ``[-mu_init, mu_init]``.
    smoothing_sigma : float, optional
        Initial width of the smoothing kernel on the component grid
        (default ``0.25 * sqrt(2 K)`` per layer).
    min_smoothing_sigma : float, default=0.01
        Final width of the smoothing kernel (then the loss is the plain
        max-component log-likelihood).
    annealing : "plateau" or float in (0, 1], default=0.5
        How the smoothing width and the learning rate shrink. ``"plateau"``:
        the reference code's rule (multiply both by ``anneal_factor`` when the
        layer's loss plateaus; needs long runs: about 50 reductions from the
        initial width to ``min_smoothing_sigma``). A float ``a``: a fixed
        geometric decay from the initial to the final values over the
        fraction ``a`` of each layer's training steps (practical for short
        runs).
    anneal_factor : float, default=0.9
        Factor applied to the smoothing width and learning rate when a layer's
        loss plateaus.
    anneal_window : int, default=100
        Number of mini-batches over which the loss is averaged for the
        plateau test.
    anneal_delta : float, default=0.05
        Plateau threshold: the last window improved the loss by less than
        ``anneal_delta`` times the improvement since the first window.
    delay : float, default=0.1
        A ``G`` layer with ``L`` ``G`` layers below it starts training after
        the fraction ``delay * L`` of the ``max_iter`` epochs (paper: 0.1 L).
    max_grad_norm : float, optional
        Clip the global gradient norm of each step (None: no clipping).
    classifier_layers : tuple of int, default=(-1,)
        Indices of the ``G`` layers (counted bottom-up, negative from the top)
        whose flattened activities feed the classifier. Class-conditional
        sampling starts at the highest of them.
    classifier_learning_rate : float, default=2.0
        SGD learning rate of the classifier (cross-entropy), divided by the
        mean squared norm of its input features (a normalised step: stable
        below 4 whatever the number of input positions).
    top_s : int or tuple of int, default=3
        Sampling keeps the S largest control-signal entries at each position
        (0 keeps all); one value for all ``G`` layers or one per ``G`` layer
        (bottom-up). Smaller values give cleaner, less varied samples.
    sampling_divisor : float, default=20.0
        Standard deviations are divided by this factor when sampling
        (reference code instances; 1 samples the fitted Gaussians as they are).
    sharpening_iter : int, default=300
        Gradient-sharpening iterations after every folding/pooling layer in
        the backward pass (paper: 300); 0 disables sharpening.
    sharpening_rate : float, default=0.5
        Sharpening step relative to the largest curvature of the target
        layer's log-likelihood (stable below 2).
    conditional : {"inverse", "class_prior"}, default="inverse"
        Control signal of class-conditional sampling. ``"inverse"``: the
        paper's approximate inverse of the classifier layer, fed to the
        highest ``G`` layer the classifier reads. ``"class_prior"``: the mean
        top-layer activities of the training samples of the class,
        ``p(top component | class)`` (``class_component_proba_``), fed to the
        top ``G`` layer.
    {shared_parameters}

    Attributes
    ----------
    module_ : DCGMMNet
        The fitted layers (``module_.layers``), with ``module_.classifier``
        and the training schedule's state (steps taken, every layer's
        smoothing width and learning rate).
    image_shape_ : tuple of int or None
        ``(H, W, C)`` of the inputs (None for flat inputs without
        ``image_shape``: one position with ``n_features`` channels).
    layers_ : str
        The layer specification in the paper's notation, with every ``K``.
    classes_ : ndarray of shape (n_classes,)
        Class labels, when ``fit`` received ``y``.
    class_component_proba_ : ndarray of shape (n_classes, K_top)
        Mean top-layer activities of the training samples of each class
        (when ``fit`` received ``y``).
    n_features_in_ : int
    history_ : list of dict
        Per epoch: the top layer's smoothed log-likelihood (``objective``),
        every G layer's (``loss_G1``...), smoothing widths (``sigma_G1``...),
        the classifier's cross-entropy.
    converged_, n_iter_, lower_bound_, lower_bounds_

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from skdeepmix import DCGMMEstimator
    >>> X, y = load_digits(return_X_y=True)
    >>> X = X / 16.0
    >>> est = DCGMMEstimator("F(3,1)-G(16)-F-G", image_shape=(8, 8), max_iter=3,
    ...                      random_state=0)
    >>> est = est.fit(X, y)
    >>> est.layers_
    'F(3,1)-G(16)-F-G(100)-C'
    >>> est.score_samples(X[:2]).shape
    (2,)
    >>> samples, labels = est.sample(4, y=[0, 1, 2, 3], sharpening_iter=10)
    >>> samples.shape
    (4, 64)
    """

    _parameter_constraints: dict = {
        **BaseDeepMixture._parameter_constraints,
        "layers": [str, list, tuple],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "image_shape": [tuple, list, None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "min_learning_rate": [Interval(Real, 0.0, None, closed="left")],
        "learning_rate_factors": [tuple, list],
        "min_variance": [Interval(Real, 0.0, None, closed="neither")],
        "mu_init": [Interval(Real, 0.0, None, closed="left")],
        "smoothing_sigma": [Interval(Real, 0.0, None, closed="left"), None],
        "min_smoothing_sigma": [Interval(Real, 0.0, None, closed="left")],
        "annealing": [StrOptions({"plateau"}), Interval(Real, 0.0, 1.0, closed="right")],
        "anneal_factor": [Interval(Real, 0.0, 1.0, closed="right")],
        "anneal_window": [Interval(Integral, 1, None, closed="left")],
        "anneal_delta": [Interval(Real, 0.0, None, closed="left")],
        "delay": [Interval(Real, 0.0, 1.0, closed="left")],
        "max_grad_norm": [Interval(Real, 0.0, None, closed="neither"), None],
        "classifier_layers": [tuple, list],
        "classifier_learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "top_s": [Interval(Integral, 0, None, closed="left"), tuple, list],
        "sampling_divisor": [Interval(Real, 0.0, None, closed="neither")],
        "sharpening_iter": [Interval(Integral, 0, None, closed="left")],
        "sharpening_rate": [Interval(Real, 0.0, None, closed="neither")],
        "conditional": [StrOptions({"inverse", "class_prior"})],
    }

    _fit_uses_y = True
    _accepts_images = True

    def __init__(
        self,
        layers="F-G",
        n_components=100,
        image_shape=None,
        *,
        batch_size=100,
        learning_rate=0.015,
        min_learning_rate=0.01,
        learning_rate_factors=(1.0, 0.1, 0.2),
        min_variance=0.01,
        mu_init=0.1,
        smoothing_sigma=None,
        min_smoothing_sigma=0.01,
        annealing=0.5,
        anneal_factor=0.9,
        anneal_window=100,
        anneal_delta=0.05,
        delay=0.1,
        max_grad_norm=None,
        classifier_layers=(-1,),
        classifier_learning_rate=2.0,
        top_s=3,
        sampling_divisor=20.0,
        sharpening_iter=300,
        sharpening_rate=0.5,
        conditional="inverse",
        tol=1e-2,
        max_iter=20,
        n_init=1,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        device="auto",
        dtype=None,
        chunk_size=None,
    ):
        super().__init__(
            tol=tol, max_iter=max_iter, n_init=n_init, random_state=random_state,
            warm_start=warm_start, verbose=verbose, verbose_interval=verbose_interval,
            device=device, dtype=dtype, chunk_size=chunk_size,
        )
        self.layers = layers
        self.n_components = n_components
        self.image_shape = image_shape
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.min_learning_rate = min_learning_rate
        self.learning_rate_factors = learning_rate_factors
        self.min_variance = min_variance
        self.mu_init = mu_init
        self.smoothing_sigma = smoothing_sigma
        self.min_smoothing_sigma = min_smoothing_sigma
        self.annealing = annealing
        self.anneal_factor = anneal_factor
        self.anneal_window = anneal_window
        self.anneal_delta = anneal_delta
        self.delay = delay
        self.max_grad_norm = max_grad_norm
        self.classifier_layers = classifier_layers
        self.classifier_learning_rate = classifier_learning_rate
        self.top_s = top_s
        self.sampling_divisor = sampling_divisor
        self.sharpening_iter = sharpening_iter
        self.sharpening_rate = sharpening_rate
        self.conditional = conditional

    # ------------------------------------------------------------ input
    def _input_shape(self):
        """``(H, W, C)`` of one input: ``image_shape_``, or one position."""
        return self.image_shape_ or (1, 1, self.n_features_in_)

    def _to_images(self, X):
        return X.reshape(X.shape[0], *self._input_shape())

    # ------------------------------------------------------------ build
    def _check_parameters(self, X, ctx):
        if len(tuple(self.learning_rate_factors)) != 3:
            raise ValueError(
                "learning_rate_factors must hold three factors (means, variances, weights), "
                f"got {self.learning_rate_factors!r}."
            )
        if isinstance(self.top_s, (tuple, list)) and any(
            isinstance(s, bool) or not isinstance(s, (Integral, np.integer)) or s < 0
            for s in self.top_s
        ):
            raise ValueError(f"top_s must hold non-negative ints, got {self.top_s!r}.")
        if not tuple(self.classifier_layers):
            raise ValueError("classifier_layers must name at least one G layer.")
        parse_layers(self.layers)  # raises for malformed specs

    def _initialize(self, X, ctx):
        if ctx.classes is not None:
            self.classes_ = ctx.classes
        else:
            self.__dict__.pop("classes_", None)
        n_classes = None if ctx.classes is None else len(ctx.classes)
        options = dict(
            n_components=self.n_components,
            mu_init=self.mu_init,
            min_variance=self.min_variance,
            sigma0=self.smoothing_sigma,
            sigma_min=self.min_smoothing_sigma,
            learning_rate=self.learning_rate,
            min_learning_rate=self.min_learning_rate,
            anneal_factor=self.anneal_factor,
            anneal_window=self.anneal_window,
            anneal_delta=self.anneal_delta,
        )
        classifier_layers = tuple(int(g) if isinstance(g, np.integer) else g
                                  for g in self.classifier_layers)
        self.module_ = build_module(
            lambda: DCGMMNet(parse_layers(self.layers), self._input_shape(),
                             n_classes=n_classes, classifier_layers=classifier_layers,
                             **options),
            ctx.generator, ctx.device, ctx.dtype,
        )
        # the range of the data over every process, mapped to [0, 1] by the module
        low_high = torch.stack([-X.min(), X.max()]) if X.shape[0] else X.new_full((2,), -math.inf)
        low_high = _distributed.all_reduce(low_high, "max").tolist()
        self.module_.set_input_range(-low_high[0], low_high[1])
        n_gmm = len(self.module_.gmm_indices)
        if isinstance(self.top_s, (tuple, list)) and len(self.top_s) != n_gmm:
            raise ValueError(
                f"top_s={self.top_s!r} must hold one value per G layer ({n_gmm} in "
                f"{self.module_.spec()})."
            )

    def _get_state(self):
        return copy.deepcopy(self.module_)

    def _set_state(self, state):
        self.module_ = copy.deepcopy(state)

    def _prepare_inference(self, device):
        self.module_.to(device)

    # ------------------------------------------------------------ training
    def _fit_iteration(self, X, ctx):
        net = self.module_
        n_batches = count_batches(X.shape[0], self.batch_size)
        if _distributed.gradient_sync_enabled():  # as train_epoch: the most batches of any rank
            n_batches = int(_distributed.all_reduce_scalar(n_batches, "max"))
        net.set_schedule(self.max_iter * n_batches, self.delay, self.annealing)
        optimizer = net.make_optimizer(
            tuple(float(f) for f in self.learning_rate_factors), self.classifier_learning_rate,
            reduce=ctx.partition.sum_scalar,
        )
        net.loss_sums_.zero_()
        y = ctx.y if net.classifier is not None else None

        def loss_fn(xb, yb=None):
            return net.training_losses(self._to_images(xb), yb)

        with torch.enable_grad():
            train_epoch(loss_fn, optimizer, X, ctx, batch_size=self.batch_size, y=y,
                        max_grad_norm=self.max_grad_norm, phase="training",
                        owner=type(self).__name__)
        sums = ctx.partition.sum(net.loss_sums_.clone()).tolist()  # one sync per epoch
        means = [value / max(sums[-1], 1.0) for value in sums[:-1]]
        metrics = {"objective": means[-2]}
        for g, layer in enumerate(net.gmm_layers):
            metrics[f"loss_G{g + 1}"] = means[g]
            metrics[f"sigma_G{g + 1}"] = layer.sigma
        if y is not None:
            metrics["classifier_loss"] = means[-1]
        return metrics

    def _converged(self, objectives, window=3):
        """Converged once the annealing is over and the last ``window`` epochs'
        mean objective improved on the ``window`` before by less than ``tol``
        times the improvement since the first ``window`` epochs (or fell).

        Relative to the improvement, not to the objective's magnitude: a
        log-likelihood's magnitude depends on the data's dimension and units
        (it may be near 0), its improvement does not (the reference code's
        plateau rule). Before the annealing is over the objective rises
        because the smoothing shrinks, not because of learning.
        """
        if not self.module_.annealing_done() or len(objectives) < 2 * window:
            return False
        first, old, new = (sum(part) / window for part in (
            objectives[:window], objectives[-2 * window:-window], objectives[-window:]))
        return new - old < self.tol * max(new - first, 0.0)

    def _finalize_fit(self, X, ctx):
        net = self.module_
        self.layers_ = net.spec()
        if ctx.y is None or net.classifier is None:
            self.__dict__.pop("class_component_proba_", None)
            return
        # p(top component | class): mean top-layer activities of each class
        n_classes = len(self.classes_)
        sums = counts = 0.0
        with torch.no_grad():
            chunk = self._rows_per_chunk(X.device)
            for start in range(0, X.shape[0], chunk):
                rows = slice(start, start + chunk)
                s, c = net.class_component_proba(self._to_images(X[rows]), ctx.y[rows],
                                                 n_classes)
                sums, counts = sums + s, counts + c
        sums, counts = ctx.partition.sum(sums, counts)
        self.class_component_proba_ = to_numpy(sums / counts.clamp_min(1.0)[:, None])

    def _n_parameters(self):
        return self.module_.n_parameters()

    def _work_per_row(self):
        net = self.module_
        work = sum(math.prod(s) for s in net.shapes)
        for i in net.gmm_indices:
            H, W, _ = net.shapes[i]
            work += 4 * H * W * net.layers[i].n_components
        return 2 * work

    # ------------------------------------------------------------ inference
    def _estimate_log_prob_resp(self, X):
        return self.module_.log_prob_resp(self._to_images(X))

    def _decode_labels(self, labels):
        return self.classes_[labels] if hasattr(self, "classes_") else labels

    def score_samples(self, X):
        """Log-likelihood of each sample under the top ``G`` layer.

        As in the paper (Sec. V-B: the top layer expresses sample probability
        best), this is the top ``G`` layer's max-component log-likelihood
        ``log max_k pi_k N(a; mu_k, diag(prec_k)^-1)`` of the activities ``a``
        it receives; for a one-layer model (``"F-G(K)"``) it is the
        max-component log-likelihood of a diagonal GMM on the pixels. It is
        not a normalised density of the images for deeper models (each layer
        has its own likelihood; see :meth:`score_samples_layers`).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, H, W[, C])

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        return super().score_samples(X)

    def score_samples_layers(self, X):
        """Max-component log-likelihood of every ``G`` layer (mean over its positions).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, H, W[, C])

        Returns
        -------
        log_probs : ndarray of shape (n_samples, n_gmm_layers)
            Column ``g`` is the ``g``-th ``G`` layer from the bottom (the last
            column equals :meth:`score_samples`).
        """
        return to_numpy(self._inference(
            lambda chunk: self.module_.layer_log_likelihoods(self._to_images(chunk)), X))

    # ------------------------------------------------------------ sampling
    def _backward_options(self, sharpening_iter=None):
        return dict(
            top_s=self.top_s,
            sampling_divisor=self.sampling_divisor,
            sharpening_iter=self.sharpening_iter if sharpening_iter is None else sharpening_iter,
            sharpening_rate=self.sharpening_rate,
        )

    def _sample(self, n_samples, generator, y=None, sharpening_iter=None):
        net = self.module_
        options = self._backward_options(sharpening_iter)
        top = net.gmm_indices[-1]
        if y is None:
            x, z = net.backwards(top, None, generator=generator, n_samples=n_samples, **options)
            return x.reshape(n_samples, -1), z
        if self.conditional == "class_prior":
            proba = torch.as_tensor(self.class_component_proba_, device=y.device,
                                    dtype=self._torch_dtype())
            control = proba[y].reshape(n_samples, *net.shapes[top + 1])
            x, _ = net.backwards(top, control, generator=generator, n_samples=n_samples,
                                 **options)
            return x.reshape(n_samples, -1), y
        clf = net.classifier
        target = torch.full((n_samples, clf.n_classes_), 1e-3, dtype=clf.weight.dtype,
                            device=clf.weight.device)
        target[torch.arange(n_samples), y] = 1.0
        control = clf.backwards(target / target.sum(1, keepdim=True))
        # the part of the control signal for the highest chosen G layer
        start = net.classifier_layers[-1]
        offset = sum(math.prod(net.shapes[i + 1]) for i in net.classifier_layers[:-1])
        shape = net.shapes[start + 1]
        control = control[:, offset: offset + math.prod(shape)].reshape(n_samples, *shape)
        x, _ = net.backwards(start, control, generator=generator, n_samples=n_samples,
                             **options)
        return x.reshape(n_samples, -1), y

    def sample(self, n_samples=1, y=None, *, sharpening_iter=None):
        """Generate samples by the backward pass (optionally class-conditional).

        The top ``G`` layer draws components from its mixture weights (or,
        with ``y``, the classifier's approximate inverse gives the control
        signal of the highest classifier input layer); every ``G`` layer keeps
        the ``top_s`` largest control-signal entries per position and samples
        its input; folding layers average overlaps, pooling layers up-sample,
        each followed by gradient sharpening towards the next ``G`` layer.
        Seeded by ``random_state``.

        Parameters
        ----------
        n_samples : int, default=1
        y : int or array-like of shape (n_samples,), optional
            Classes to generate (requires a supervised fit).
        sharpening_iter : int, optional
            Overrides the ``sharpening_iter`` parameter for this call.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
            Flat samples (reshape with ``image_shape_``).
        y : ndarray of shape (n_samples,)
            The class of each sample, or the top-layer component drawn.
        """
        if y is None and sharpening_iter is None:
            return super().sample(n_samples)
        check_is_fitted(self)
        if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples!r}. The sampling requires at "
                "least one sample."
            )
        n_samples = int(n_samples)
        y_idx = None
        if y is not None:
            if not hasattr(self, "classes_"):
                raise ValueError(
                    "Class-conditional sampling needs a classifier: fit the estimator with y."
                )
            y_arr = np.full(n_samples, y) if np.ndim(y) == 0 else np.asarray(y)
            if y_arr.shape != (n_samples,):
                raise ValueError(f"y must be a label or hold n_samples={n_samples} labels.")
            unknown = ~np.isin(y_arr, self.classes_)
            if unknown.any():
                raise ValueError(
                    f"Unknown classes {np.unique(y_arr[unknown])!r}; known: {self.classes_!r}."
                )
            y_idx = np.searchsorted(self.classes_, y_arr)
        device = self._runtime_device()
        generator = make_generator(self.random_state, device)
        with self._threads(n_samples, device), torch.no_grad():
            self._prepare_inference(device)
            y_t = None if y_idx is None else torch.as_tensor(y_idx, device=device)
            X, labels = self._sample(n_samples, generator, y=y_t, sharpening_iter=sharpening_iter)
        labels = to_numpy(labels).astype(np.int64) if y_idx is None else self.classes_[y_idx]
        return to_numpy(X), labels

    def inpaint(self, X, mask, *, sharpening_iter=None):
        """Fill the missing pixels of ``X`` (paper Sec. III-J).

        Forward pass to the top ``G`` layer (missing pixels set to 0), then a
        backward pass with the top layer's activities as control signal; the
        known pixels are kept (also during sharpening).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, H, W[, C])
        mask : array-like of bool, same shape as X
            True where a value is missing.
        sharpening_iter : int, optional
            Overrides the ``sharpening_iter`` parameter for this call.

        Returns
        -------
        X_filled : ndarray of the shape of X
        """
        check_is_fitted(self)
        shape = np.shape(X)
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"mask has shape {mask.shape} but X has shape {shape}.")
        if mask.dtype != bool:
            raise TypeError(f"mask must be boolean (True = missing), got dtype {mask.dtype}.")
        Xv = self._validate_X(np.where(mask, 0.0, np.asarray(X, dtype=float)), reset=False)
        mask_flat = mask.reshape(Xv.shape[0], -1)
        device = self._runtime_device()
        generator = make_generator(self.random_state, device)
        net = self.module_
        top = net.gmm_indices[-1]
        options = self._backward_options(sharpening_iter)
        filled = np.empty(Xv.shape, dtype=Xv.dtype)
        with self._threads(Xv.shape[0], device), torch.no_grad():
            self._prepare_inference(device)
            chunk = self._rows_per_chunk(device)
            for start in range(0, Xv.shape[0], chunk):
                rows = slice(start, start + chunk)
                xb = self._to_images(to_tensor(Xv[rows], device, self._torch_dtype()))
                known = self._to_images(torch.as_tensor(~mask_flat[rows], device=device))
                outputs, _ = net.forward_all(xb, upto=top)
                x, _ = net.backwards(top, outputs[top], generator=generator,
                                     n_samples=xb.shape[0], fixed=(known, xb), **options)
                filled[rows] = to_numpy(x.reshape(xb.shape[0], -1))
        return filled.reshape(shape)
