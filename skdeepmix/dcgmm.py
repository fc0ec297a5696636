"""Deep convolutional Gaussian mixture model (DCGMM) estimator."""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    check_array,
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
)

from ._base import BaseDeepMixture
from ._torch_utils import make_generator, to_numpy, to_tensor
from ._train import iter_minibatches
from .nn.dcgmm import ConvGMM, DCGMMNet, LinearClassifier, format_layers, parse_layers

__all__ = ["DCGMMEstimator"]


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

    Parameters
    ----------
    layers : str or list, default="F-G(25)"
        Layer specification in the paper's notation, layers joined by ``-``,
        e.g. ``"F(3,1)-G(25)-F(4,2)-G(25)-F(12,1)-G(25)"`` (DCGMM-E on 28x28
        images) or ``"F(28,2)-G(25)"`` (DCGMM-A). ``F`` without arguments
        folds the whole input into one position (so the default ``"F-G(25)"``
        is DCGMM-A for any input); ``G(K, shared=False)`` gives every position
        its own parameters; a last ``C`` marks the classifier (one is added
        automatically when ``fit`` gets ``y``). A list of layer objects from
        :mod:`skdeepmix.nn.dcgmm` is accepted too. The top ``G`` layer must
        have a single (1x1) position.
    image_shape : tuple of int, optional
        ``(H, W)`` or ``(H, W, C)`` of flat inputs of shape ``(n, H*W*C)``
        (pixels in row-major order, channels last). Not needed for
        image-shaped inputs ``(n, H, W)`` / ``(n, H, W, C)``; flat inputs
        without it are a single position with ``n_features`` channels.
    batch_size : int, default=100
        Mini-batch size (reference code: 100).
    learning_rate : float, default=0.05
        Initial SGD learning rate of the ``G`` layers, shrunk with the
        smoothing width down to ``learning_rate_min`` (the reference code uses
        0.011 -> 0.01 over 40-80 epochs; 0.05 suits short CPU runs).
    learning_rate_min : float, default=0.01
    lr_factors : tuple of 3 float, default=(1.0, 0.1, 0.2)
        Learning-rate factors of the means, the (square roots of the)
        precisions and the weight logits.
    precision_bound : float, default=20.0
        Upper bound of the diagonal precisions (the standard deviations stay
        above ``1/sqrt(precision_bound)``); also their initial value.
    mu_init : float, default=0.1
        Means are initialised uniformly in ``[-mu_init, mu_init]``.
    smoothing_sigma0 : float, optional
        Initial width of the smoothing kernel on the component grid
        (default ``0.25 * sqrt(2 K)`` per layer).
    smoothing_sigma_min : float, default=0.01
    annealing : "plateau" or float in (0, 1], default=0.5
        How the smoothing width and the learning rate shrink. ``"plateau"``:
        the reference code's rule (multiply both by ``anneal_factor`` when the
        layer's loss plateaus; needs long runs: about 50 reductions from the
        initial width to ``smoothing_sigma_min``). A float ``a``: a fixed
        geometric decay from the initial to the minimal values over the
        fraction ``a`` of each layer's training time (practical for short CPU
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
    sharpening_iterations : int, default=300
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
    max_iter : int, default=20
        Number of epochs.
    tol : float, default=1e-3
        Training stops when the top layer's epoch-mean loss changes by less.
    n_init : int, default=1
    random_state : int, RandomState or None, default=None
    warm_start : bool, default=False
    verbose : int, default=0
    device : {'auto', 'cpu', 'cuda', 'cuda:N'} or torch.device, default='auto'
    dtype : {'float32', 'float64'} or None, default=None
        Precision of the computation and of the fitted attributes. ``None``
        uses the input's floating dtype (float32 stays float32, anything else
        becomes float64), as scikit-learn does.

    Attributes
    ----------
    module_ : DCGMMNet
        The fitted layers (``module_.layers``), with ``module_.classifier``.
    image_shape_ : tuple of int
        ``(H, W, C)`` of the inputs.
    layers_ : str
        The layer specification in the paper's notation.
    classes_ : ndarray of shape (n_classes,)
        Class labels, when ``fit`` received ``y``.
    class_component_proba_ : ndarray of shape (n_classes, K_top)
        Mean top-layer activities of the training samples of each class
        (when ``fit`` received ``y``).
    n_features_in_ : int
    history_ : list of dict
        Per epoch: the top layer's loss (``objective``), every G layer's loss
        (``loss_G1``...), smoothing widths (``sigma_G1``...), classifier loss.
    converged_, n_iter_, lower_bound_, lower_bounds_

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from skdeepmix.dcgmm import DCGMMEstimator
    >>> X, y = load_digits(return_X_y=True)
    >>> X = X / 16.0
    >>> est = DCGMMEstimator("F(3,1)-G(16)-F-G(16)", image_shape=(8, 8),
    ...                      max_iter=3, anneal_window=20, random_state=0)
    >>> est = est.fit(X, y)
    >>> est.score_samples(X[:2]).shape
    (2,)
    >>> samples, labels = est.sample(4, y=[0, 1, 2, 3])
    >>> samples.shape
    (4, 64)
    """

    _parameter_constraints: dict = {
        **BaseDeepMixture._parameter_constraints,
        "layers": [str, list, tuple],
        "image_shape": [tuple, list, None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "learning_rate_min": [Interval(Real, 0.0, None, closed="left")],
        "lr_factors": [tuple, list],
        "precision_bound": [Interval(Real, 0.0, None, closed="neither")],
        "mu_init": [Interval(Real, 0.0, None, closed="left")],
        "smoothing_sigma0": [Interval(Real, 0.0, None, closed="left"), None],
        "smoothing_sigma_min": [Interval(Real, 0.0, None, closed="left")],
        "anneal_factor": [Interval(Real, 0.0, 1.0, closed="right")],
        "annealing": [StrOptions({"plateau"}), Interval(Real, 0.0, 1.0, closed="right")],
        "anneal_window": [Interval(Integral, 1, None, closed="left")],
        "anneal_delta": [Interval(Real, 0.0, None, closed="left")],
        "delay": [Interval(Real, 0.0, 1.0, closed="left")],
        "classifier_layers": [tuple, list],
        "classifier_learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "top_s": [Interval(Integral, 0, None, closed="left"), tuple, list],
        "sampling_divisor": [Interval(Real, 0.0, None, closed="neither")],
        "sharpening_iterations": [Interval(Integral, 0, None, closed="left")],
        "sharpening_rate": [Interval(Real, 0.0, None, closed="neither")],
        "conditional": [StrOptions({"inverse", "class_prior"})],
    }

    _fit_uses_y = True

    def __init__(
        self,
        layers="F-G(25)",
        image_shape=None,
        *,
        batch_size=100,
        learning_rate=0.05,
        learning_rate_min=0.01,
        lr_factors=(1.0, 0.1, 0.2),
        precision_bound=20.0,
        mu_init=0.1,
        smoothing_sigma0=None,
        smoothing_sigma_min=0.01,
        annealing=0.5,
        anneal_factor=0.9,
        anneal_window=100,
        anneal_delta=0.05,
        delay=0.1,
        classifier_layers=(-1,),
        classifier_learning_rate=2.0,
        top_s=3,
        sampling_divisor=20.0,
        sharpening_iterations=300,
        sharpening_rate=0.5,
        conditional="inverse",
        max_iter=20,
        tol=1e-3,
        n_init=1,
        random_state=None,
        warm_start=False,
        verbose=0,
        device="auto",
        dtype=None,
    ):
        self.layers = layers
        self.image_shape = image_shape
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_min = learning_rate_min
        self.lr_factors = lr_factors
        self.precision_bound = precision_bound
        self.mu_init = mu_init
        self.smoothing_sigma0 = smoothing_sigma0
        self.smoothing_sigma_min = smoothing_sigma_min
        self.annealing = annealing
        self.anneal_factor = anneal_factor
        self.anneal_window = anneal_window
        self.anneal_delta = anneal_delta
        self.delay = delay
        self.classifier_layers = classifier_layers
        self.classifier_learning_rate = classifier_learning_rate
        self.top_s = top_s
        self.sampling_divisor = sampling_divisor
        self.sharpening_iterations = sharpening_iterations
        self.sharpening_rate = sharpening_rate
        self.conditional = conditional
        self.max_iter = max_iter
        self.tol = tol
        self.n_init = n_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.device = device
        self.dtype = dtype

    # ------------------------------------------------------------ input
    def _image_shape_from_param(self, n_features):
        if self.image_shape is None:
            return (1, 1, n_features)
        shape = tuple(self.image_shape)
        if len(shape) == 2:
            shape = shape + (1,)
        if len(shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, (Integral, np.integer)) or s < 1
            for s in shape
        ):
            raise ValueError(
                f"image_shape must be (H, W) or (H, W, C) positive ints, got {self.image_shape!r}."
            )
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != n_features:
            raise ValueError(
                f"image_shape={self.image_shape!r} holds {math.prod(shape)} values but X has "
                f"{n_features} features."
            )
        return shape

    def _validate_X(self, X, *, reset):
        """Accept flat ``(n, H*W*C)`` or image-shaped ``(n, H, W[, C])`` arrays.

        Returns a validated flat 2-D array; sets ``image_shape_`` when ``reset``.
        """
        image = None
        if not hasattr(X, "iloc") and not isinstance(X, (list, tuple)):
            ndim = getattr(X, "ndim", None)
            if ndim in (3, 4):
                X = np.asarray(X)
                image = X.shape[1:] + ((1,) if ndim == 3 else ())
                X = X.reshape(X.shape[0], -1)
        X = super()._validate_X(X, reset=reset)
        if reset:
            if image is None:
                self.image_shape_ = self._image_shape_from_param(X.shape[1])
            else:
                self.image_shape_ = tuple(int(s) for s in image)
                if self.image_shape is not None and self._image_shape_from_param(
                        X.shape[1]) != self.image_shape_:
                    raise ValueError(
                        f"X holds images of shape {self.image_shape_} but "
                        f"image_shape={self.image_shape!r}."
                    )
        elif image is not None and tuple(image) != tuple(self.image_shape_):
            raise ValueError(
                f"X has images of shape {tuple(image)} but {type(self).__name__} was "
                f"fitted on images of shape {self.image_shape_}."
            )
        return X

    def _validate_fit_input(self, X, y):
        X = self._validate_X(X, reset=True)
        if y is None:
            return X, None
        y = column_or_1d(check_array(y, ensure_2d=False, dtype=None), warn=True)
        check_consistent_length(X, y)
        return X, y

    def _to_images(self, X):
        return X.reshape(X.shape[0], *self.image_shape_)

    # ------------------------------------------------------------ build
    def _check_parameters(self, X):
        if len(tuple(self.lr_factors)) != 3:
            raise ValueError(
                "lr_factors must hold three factors (means, precisions, weights), got "
                f"{self.lr_factors!r}."
            )
        if isinstance(self.top_s, (tuple, list)) and any(
            isinstance(s, bool) or not isinstance(s, (Integral, np.integer)) or s < 0
            for s in self.top_s
        ):
            raise ValueError(f"top_s must hold non-negative ints, got {self.top_s!r}.")
        if not tuple(self.classifier_layers):
            raise ValueError("classifier_layers must name at least one G layer.")
        parse_layers(self.layers)  # raises for malformed specs

    def _build(self, generator, device, n_classes):
        layers = parse_layers(self.layers)
        spec_clf = layers.pop() if isinstance(layers[-1], LinearClassifier) else None
        net = DCGMMNet(
            layers,
            self.image_shape_,
            generator=generator,
            dtype=self._torch_dtype(),
            device=device,
            mu_init=self.mu_init,
            precision_bound=self.precision_bound,
            sigma0=self.smoothing_sigma0,
            sigma_min=self.smoothing_sigma_min,
            learning_rate=self.learning_rate,
            learning_rate_min=min(self.learning_rate_min, self.learning_rate),
            anneal_factor=self.anneal_factor,
            anneal_window=self.anneal_window,
            anneal_delta=self.anneal_delta,
        )
        n_gmm = len(net.gmm_indices)
        if isinstance(self.top_s, (tuple, list)) and len(self.top_s) != n_gmm:
            raise ValueError(
                f"top_s={self.top_s!r} must hold one value per G layer ({n_gmm} in "
                f"{format_layers(layers)})."
            )
        if n_classes is not None:
            chosen = []
            for g in self.classifier_layers:
                if isinstance(g, bool) or not isinstance(g, (Integral, np.integer)) or not (
                    -n_gmm <= g < n_gmm
                ):
                    raise ValueError(
                        f"classifier_layers={self.classifier_layers!r}: entries must be G-layer "
                        f"indices in [-{n_gmm}, {n_gmm - 1}] ({format_layers(layers)})."
                    )
                chosen.append(net.gmm_indices[int(g) % n_gmm])
            chosen = sorted(set(chosen))
            if spec_clf is not None and spec_clf.n_classes not in (None, n_classes):
                raise ValueError(
                    f"The classifier layer C({spec_clf.n_classes}) does not match the "
                    f"{n_classes} classes in y."
                )
            clf = LinearClassifier(n_classes)
            n_inputs = sum(math.prod(net.shapes[i + 1]) for i in chosen)
            clf.build(n_inputs, n_classes, generator=generator, dtype=self._torch_dtype(),
                      device=device)
            net.classifier = clf
            net.classifier_layers = tuple(chosen)
        return net

    def _initialize(self, X, generator, y=None):
        n_classes = None
        if y is not None:
            self.classes_ = self._fit_classes
            n_classes = len(self.classes_)
        elif hasattr(self, "classes_"):
            del self.classes_
        self.module_ = self._build(generator, X.device, n_classes)
        self.n_updates_ = 0

    def _get_state(self):
        return {"module": copy.deepcopy(self.module_), "n_updates": self.n_updates_}

    def _set_state(self, state):
        self.module_ = copy.deepcopy(state["module"])
        self.n_updates_ = state["n_updates"]

    def _prepare_inference(self, device):
        self.module_.to(device)

    # ------------------------------------------------------------ training
    def _layer_start_fractions(self):
        n_gmm = len(self.module_.gmm_indices)
        return [min(self.delay * g, 1.0) for g in range(n_gmm)]

    def _fit_iteration(self, X, generator, y=None):
        net = self.module_
        n = X.shape[0]
        n_batches = math.ceil(n / min(self.batch_size, n))
        total = max(self.max_iter * n_batches, 1)
        starts = self._layer_start_fractions()
        y_idx = y.long() if (y is not None and net.classifier is not None) else None
        clf_start = max(starts[net.gmm_indices.index(i)] for i in net.classifier_layers) if (
            y_idx is not None) else 1.0
        sums = np.zeros(len(starts))
        clf_sum, clf_count, count = 0.0, 0, 0
        lr_factors = tuple(float(f) for f in self.lr_factors)
        scheduled = self.annealing != "plateau"
        for index in net.gmm_indices:
            net.layers[index].plateau_annealing = not scheduled
        for batch in iter_minibatches(n, self.batch_size, generator):
            progress = self.n_updates_ / total
            active = [progress >= s for s in starts]
            if scheduled:
                for g, index in enumerate(net.gmm_indices):
                    if active[g]:
                        span = max(self.annealing * (1.0 - starts[g]), 1e-12)
                        net.layers[index].set_annealing((progress - starts[g]) / span)
            xb = self._to_images(X[batch])
            losses, clf_loss = net.train_batch(
                xb,
                active=active,
                lr_factors=lr_factors,
                y=None if y_idx is None else y_idx[batch],
                classifier_lr=self.classifier_learning_rate,
                classifier_active=progress >= clf_start,
            )
            sums += np.asarray(losses) * batch.numel()
            count += batch.numel()
            if clf_loss is not None:
                clf_sum += clf_loss * batch.numel()
                clf_count += batch.numel()
            self.n_updates_ += 1
        means = sums / max(count, 1)
        metrics = {"objective": float(means[-1])}
        for g, index in enumerate(net.gmm_indices):
            metrics[f"loss_G{g + 1}"] = float(means[g])
            metrics[f"sigma_G{g + 1}"] = float(net.layers[index].sigma)
        if clf_count:
            metrics["classifier_loss"] = clf_sum / clf_count
        return metrics

    def _finalize_fit(self, X, y=None):
        net = self.module_
        self.layers_ = format_layers(net.layers) + ("-C" if net.classifier is not None else "")
        if y is not None and net.classifier is not None:
            # p(top component | class): mean top-layer activities of each class
            top = net.gmm_indices[-1]
            with torch.no_grad():
                acts = self._map_chunks(
                    lambda c: net.forward_all(self._to_images(c), upto=top)[0][top]
                    .reshape(c.shape[0], -1), X, X.device)
            y = y.long()
            sums = acts.new_zeros(len(self.classes_), acts.shape[1]).index_add_(0, y, acts)
            counts = torch.bincount(y, minlength=len(self.classes_)).clamp_min(1)
            self.class_component_proba_ = to_numpy(sums / counts[:, None].to(sums.dtype))

    def _n_parameters(self):
        net = self.module_
        n = sum(net.layers[i].n_parameters() for i in net.gmm_indices)
        if net.classifier is not None:
            n += net.classifier.weight.numel() + net.classifier.bias.numel()
        return n

    def _work_per_row(self):
        net = self.module_
        work = sum(math.prod(s) for s in net.shapes)
        for i in net.gmm_indices:
            H, W, _ = net.shapes[i]
            work += 4 * H * W * net.layers[i].n_components
        return 2 * work

    # ------------------------------------------------------------ inference
    def _estimate_log_prob_resp(self, X):
        net = self.module_
        outputs, log_scores = net.forward_all(self._to_images(X))
        top = net.gmm_indices[-1]
        log_prob = ConvGMM.max_log_likelihood(log_scores[top])
        if net.classifier is not None:
            logits = net.classifier(net.classifier_features(outputs))
            log_resp = torch.log_softmax(logits, dim=1)
        else:
            log_resp = torch.log_softmax(log_scores[top].reshape(X.shape[0], -1), dim=1)
        return log_prob, log_resp

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
        return to_numpy(
            self._inference(lambda chunk: self.module_.layer_log_likelihoods(
                self._to_images(chunk)), X)
        )

    def predict(self, X):
        """Class (after a supervised fit) or top-layer component of each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, H, W[, C])

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        labels = super().predict(X)
        return self.classes_[labels] if hasattr(self, "classes_") else labels

    def predict_proba(self, X):
        """Class probabilities (supervised fit) or top-layer posteriors.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, H, W[, C])

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes or K_top)
        """
        return super().predict_proba(X)

    def fit_predict(self, X, y=None):
        """Fit and predict (classes when ``y`` is given, else top-layer components).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, H, W[, C])
        y : array-like of shape (n_samples,), optional
            Class labels: also trains the classifier layer.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        self._fit_classes = None
        if y is not None:
            y = column_or_1d(check_array(y, ensure_2d=False, dtype=None), warn=True)
            self._fit_classes, y = np.unique(y, return_inverse=True)
        try:
            labels = super().fit_predict(X, y)
        finally:
            del self._fit_classes
        return self.classes_[labels] if hasattr(self, "classes_") else labels

    # ------------------------------------------------------------ sampling
    def _backward_options(self, sharpening_iterations=None):
        return dict(
            top_s=self.top_s,
            sampling_divisor=self.sampling_divisor,
            sharpening_iterations=(
                self.sharpening_iterations if sharpening_iterations is None
                else sharpening_iterations
            ),
            sharpening_rate=self.sharpening_rate,
        )

    def _sample(self, n_samples, generator, y=None, sharpening_iterations=None):
        net = self.module_
        options = self._backward_options(sharpening_iterations)
        if y is None:
            x, z = net.backwards(net.gmm_indices[-1], None, generator=generator,
                                 n_samples=n_samples, **options)
            return x.reshape(n_samples, -1), z
        if self.conditional == "class_prior":
            proba = torch.as_tensor(self.class_component_proba_, device=y.device,
                                    dtype=self._torch_dtype())
            top = net.gmm_indices[-1]
            control = proba[y].reshape(n_samples, *net.shapes[top + 1])
            x, _ = net.backwards(top, control, generator=generator, n_samples=n_samples,
                                 **options)
            return x.reshape(n_samples, -1), y
        clf = net.classifier
        target = torch.full((n_samples, clf.n_classes_), 1e-3, dtype=clf.weight.dtype,
                            device=clf.weight.device)
        target[torch.arange(n_samples), y] = 1.0
        target = target / target.sum(1, keepdim=True)
        control = clf.backwards(target)
        # the part of the control signal for the highest chosen G layer
        start = net.classifier_layers[-1]
        offset = sum(math.prod(net.shapes[i + 1]) for i in net.classifier_layers[:-1])
        shape = net.shapes[start + 1]
        control = control[:, offset: offset + math.prod(shape)].reshape(n_samples, *shape)
        x, _ = net.backwards(start, control, generator=generator, n_samples=n_samples,
                             **options)
        return x.reshape(n_samples, -1), y

    def sample(self, n_samples=1, y=None, *, sharpening_iterations=None):
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
        sharpening_iterations : int, optional
            Overrides the ``sharpening_iterations`` parameter for this call.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
            Flat samples (reshape with ``image_shape_``).
        y : ndarray of shape (n_samples,)
            The class of each sample, or the top-layer component drawn.
        """
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
        self._prepare_inference(device)
        generator = make_generator(self.random_state, device)
        with torch.no_grad():
            if y_idx is None:
                X, labels = self._sample(n_samples, generator,
                                         sharpening_iterations=sharpening_iterations)
                labels = to_numpy(labels).astype(np.int64)
            else:
                X, _ = self._sample(n_samples, generator,
                                    y=torch.as_tensor(y_idx, device=device),
                                    sharpening_iterations=sharpening_iterations)
                labels = self.classes_[y_idx]
        return to_numpy(X), labels

    def inpaint(self, X, mask, *, sharpening_iterations=None):
        """Fill the missing pixels of ``X`` (paper Sec. III-J).

        Forward pass to the top ``G`` layer (missing pixels set to 0), then a
        backward pass with the top layer's activities as control signal; the
        known pixels are kept (also during sharpening).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, H, W[, C])
        mask : array-like of bool, same shape as X
            True where a value is missing.
        sharpening_iterations : int, optional
            Overrides the ``sharpening_iterations`` parameter for this call.

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
        X_arr = np.where(mask, 0.0, np.asarray(X, dtype=float))
        Xv = self._validate_X(X_arr, reset=False)
        mask_flat = mask.reshape(Xv.shape[0], -1)
        device = self._runtime_device()
        self._prepare_inference(device)
        generator = make_generator(self.random_state, device)
        net = self.module_
        options = self._backward_options(sharpening_iterations)
        results = []
        with torch.no_grad():
            for start in range(0, Xv.shape[0], self._rows_per_chunk()):
                rows = slice(start, start + self._rows_per_chunk())
                xb = self._to_images(to_tensor(Xv[rows], device, self._torch_dtype()))
                known = self._to_images(torch.as_tensor(~mask_flat[rows], device=device))
                outputs, _ = net.forward_all(xb)
                top = net.gmm_indices[-1]
                x, _ = net.backwards(top, outputs[top], generator=generator,
                                     n_samples=xb.shape[0], fixed=(known, xb), **options)
                results.append(x.reshape(xb.shape[0], -1))
        filled = to_numpy(torch.cat(results)).astype(Xv.dtype, copy=False)
        return filled.reshape(shape)

