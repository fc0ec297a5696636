"""Tests of the deep convolutional GMM (layers, spec parser, estimator)."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from skdeepmix.dcgmm import DCGMMEstimator
from skdeepmix.nn.dcgmm import (
    ConvGMM,
    Folding,
    MaxPooling,
    parse_layers,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y


@pytest.fixture(scope="module")
def supervised_model(digits):
    X, y = digits
    est = DCGMMEstimator(
        "F(3,1)-G(16)-F-G(25)", image_shape=(8, 8), max_iter=30,
        classifier_layers=(-2, -1), sharpening_iter=20, random_state=0, device="cpu",
    )
    return est.fit(X[:1000], y[:1000])


# --------------------------------------------------------------- layers
def _brute_force_fold_backwards(t, in_shape, f, stride):
    H, W, C = in_shape
    N, Ho, Wo, _ = t.shape
    acc = np.zeros((N, H, W, C))
    cnt = np.zeros((H, W, C))
    t = t.reshape(N, Ho, Wo, f, f, C)
    for i in range(Ho):
        for j in range(Wo):
            acc[:, i * stride:i * stride + f, j * stride:j * stride + f, :] += t[:, i, j]
            cnt[i * stride:i * stride + f, j * stride:j * stride + f, :] += 1
    return np.where(cnt > 0, acc / np.maximum(cnt, 1), 0.0)


def test_folding_forward_layout():
    # channel fastest, then kernel column, then kernel row (paper eq. 9)
    x = torch.arange(2 * 4 * 5 * 3, dtype=torch.float64).reshape(2, 4, 5, 3)
    layer = Folding(2, 1)
    assert layer.build((4, 5, 3)) == (3, 4, 12)
    out = layer(x)
    for h, w, c in [(0, 0, 0), (2, 3, 7), (1, 2, 11)]:
        ky, rest = divmod(c, 2 * 3)
        kx, ch = divmod(rest, 3)
        assert out[1, h, w, c] == x[1, h + ky, w + kx, ch]


@pytest.mark.parametrize("in_shape, f", [((6, 8, 3), 2), ((9, 9, 1), 3), ((5, 7, 2), None)])
def test_folding_backwards_is_exact_without_overlap(in_shape, f):
    layer = Folding(f, f) if f is not None else Folding()
    layer.build(in_shape)
    x = torch.rand(3, *in_shape, dtype=torch.float64)
    assert torch.equal(layer.backwards(layer(x)), x)


@pytest.mark.parametrize("in_shape, f, stride", [((7, 7, 2), 3, 1), ((8, 8, 1), 4, 2),
                                                  ((9, 8, 3), 3, 2)])
def test_folding_backwards_averages_overlaps(in_shape, f, stride):
    layer = Folding(f, stride)
    out_shape = layer.build(in_shape)
    t = torch.rand(2, *out_shape, dtype=torch.float64)
    expected = _brute_force_fold_backwards(t.numpy(), in_shape, f, stride)
    np.testing.assert_allclose(layer.backwards(t).numpy(), expected, atol=1e-12)
    # the average of identical copies gives the input back (covered pixels)
    x = torch.rand(2, *in_shape, dtype=torch.float64)
    back = layer.backwards(layer(x)).numpy()
    covered = expected[0] != 0
    np.testing.assert_allclose(back[:, covered], x.numpy()[:, covered])


def test_max_pooling_forward_and_upsampling():
    layer = MaxPooling(2, 2)
    assert layer.build((6, 4, 3)) == (3, 2, 3)
    x = torch.rand(2, 6, 4, 3)
    expected = torch.nn.functional.max_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert torch.equal(layer(x), expected)
    t = torch.rand(2, 3, 2, 3)
    up = t.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(layer.backwards(t), up)


def test_conv_gmm_shared_equals_independent_with_equal_parameters():
    torch.manual_seed(0)
    shared, indep = ConvGMM(4), ConvGMM(4, shared=False)
    shared.build((3, 2, 5), dtype=torch.float64)
    indep.build((3, 2, 5), dtype=torch.float64)
    with torch.no_grad():
        shared.prec_sqrt.uniform_(0.5, 2.0)
        shared.weight_logits.normal_()
        for name in ("mu", "prec_sqrt", "weight_logits"):
            getattr(indep, name).copy_(getattr(shared, name).expand_as(getattr(indep, name)))
    x = torch.rand(7, 3, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(shared.log_scores(x), indep.log_scores(x))


def test_smoothed_loss_reduces_to_max_component_when_annealed():
    layer = ConvGMM(9)
    layer.build((2, 2, 3), dtype=torch.float64, sigma0=0.01)
    x = torch.rand(5, 2, 2, 3, dtype=torch.float64)
    scores = layer.log_scores(x)
    torch.testing.assert_close(layer.smoothed_loss(scores), ConvGMM.max_log_likelihood(scores))
    wide = ConvGMM(9)
    wide.build((2, 2, 3), dtype=torch.float64)  # sigma0 = 0.25 sqrt(2K)
    assert wide.smoothing_.shape == (9, 9)
    assert torch.allclose(wide.smoothing_.sum(1), torch.ones(9, dtype=torch.float64))
    assert (wide.smoothing_ > 0.01).sum() > 9  # neighbours on the torus get weight


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("sigma0", [0.8, 0.01])  # smoothed, and the identity kernel
def test_closed_form_gradient_equals_autograd(shared, sigma0):
    layer = ConvGMM(6, shared=shared)
    layer.build((3, 2, 4), dtype=torch.float64, sigma0=sigma0,
                generator=torch.Generator().manual_seed(0))
    assert layer.kernel_is_identity == (sigma0 == 0.01)
    with torch.no_grad():
        layer.prec_sqrt.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
        layer.weight_logits.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.rand(9, 3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    upstream = torch.rand(9, dtype=torch.float64) - 0.5
    params = (layer.mu, layer.prec_sqrt, layer.weight_logits)
    log_lik, scores = layer.training_log_likelihood(x)
    expected_scores = layer.log_scores(x)
    expected = layer.smoothed_loss(expected_scores)
    torch.testing.assert_close(log_lik, expected)
    torch.testing.assert_close(scores, expected_scores.detach())
    got = torch.autograd.grad((log_lik * upstream).sum(), params)
    want = torch.autograd.grad((expected * upstream).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_plateau_annealing_rule():
    layer = ConvGMM(4)
    layer.build((1, 1, 2), anneal_window=2, anneal_factor=0.5, learning_rate=0.04,
                min_learning_rate=0.01)
    sigma0 = layer.sigma
    for average in [0.0, 10.0, 20.0]:  # window averages: steady improvement
        layer.plateau_update(average)
    assert layer.sigma == sigma0
    layer.plateau_update(20.1)  # plateau: < 5 % of the improvement so far
    assert layer.sigma == sigma0 * 0.5 and layer.learning_rate == 0.02
    # the window: two steps of accumulated batch losses give one average
    layer.window_loss_ += 30.0
    layer.end_window_step()
    assert layer.n_windows == 4
    layer.window_loss_ += 30.0
    layer.end_window_step(reduce=lambda total: total)
    assert layer.n_windows == 5 and layer.last_average == 30.0
    assert float(layer.window_loss_) == 0.0
    layer.set_annealing(1.0)  # the scheduled variant ends at the minima
    assert layer.sigma == pytest.approx(0.01) and layer.learning_rate == pytest.approx(0.01)


# ---------------------------------------------------------------- parser
def test_parse_paper_spec():
    layers = parse_layers("F(3,1)-G(25)-F(4,2)-G(25)-F(12,1)-G(25)-C(10)")
    assert [type(layer).__name__ for layer in layers] == [
        "Folding", "ConvGMM", "Folding", "ConvGMM", "Folding", "ConvGMM", "LinearClassifier"]
    assert "-".join(map(repr, layers)) == "F(3,1)-G(25)-F(4,2)-G(25)-F(12,1)-G(25)-C(10)"
    assert repr(parse_layers("F-G(4,shared=False)")[1]) == "G(4,shared=False)"
    from_objects = parse_layers([Folding(3, 1), "G(9)", Folding(), ConvGMM(4)])
    assert "-".join(map(repr, from_objects)) == "F(3,1)-G(9)-F-G(4)"


@pytest.mark.parametrize("spec, match", [
    ("", "empty"),
    ("F(3,1)-X(2)", "Malformed layer 'X\\(2\\)'"),
    ("F(3,1,2)-G(4)", "Malformed layer"),
    ("F(3,1)-G(0)", "positive integers"),
    ("F(3,1)-G(2.5)", "not an integer"),
    ("F(3,1)-G(4", "Malformed layer"),
    ("F(3,1)--G(4)", "Malformed layer"),
    ("F(3,1)", "at least one G"),
    ("G(4)-C-G(3)", "classifier C may only appear once, as the last"),
    ("G(4)-F(2,2)", "last layer"),
    ("G(4,shared=maybe)", "not an integer"),
    ("G(4,foo=True)", "Malformed layer"),
])
def test_parse_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_layers(spec)


def test_parse_type_error():
    with pytest.raises(TypeError, match="layers must be a string"):
        parse_layers(3)
    with pytest.raises(TypeError, match="Layer lists hold"):
        parse_layers([Folding(), 5])


def test_shapes_that_do_not_fit(digits):
    X, _ = digits
    with pytest.raises(ValueError, match="kernel 10x10 is larger than its input 8x8x1"):
        DCGMMEstimator("F(10,1)-G(4)", image_shape=(8, 8), max_iter=1).fit(X[:50])
    with pytest.raises(ValueError, match="must see the whole image"):
        DCGMMEstimator("F(3,1)-G(4)", image_shape=(8, 8), max_iter=1).fit(X[:50])
    with pytest.raises(ValueError, match="larger than its input 1x1x64"):
        DCGMMEstimator("F(3,1)-G(4)-F-G(4)", max_iter=1).fit(X[:50])  # no image_shape
    with pytest.raises(ValueError, match="image_shape"):
        DCGMMEstimator("F-G(4)", image_shape=(7, 8), max_iter=1).fit(X[:50])
    with pytest.raises(ValueError, match="does not match the 10 classes"):
        DCGMMEstimator("F-G(4)-C(3)", image_shape=(8, 8), max_iter=1).fit(X[:80], _[:80])
    with pytest.raises(ValueError, match="classifier_layers"):
        DCGMMEstimator("F-G(4)", classifier_layers=(3,), max_iter=1).fit(X[:80], _[:80])


# -------------------------------------------------------------- estimator
def test_single_layer_equals_diagonal_gmm_max_component(digits):
    X, _ = digits
    est = DCGMMEstimator("F-G(6)", image_shape=(8, 8), max_iter=3, anneal_window=5,
                         random_state=0, dtype="float64", device="cpu").fit(X[:300])
    layer = est.module_.layers[1]
    mu = layer.mu.detach().numpy()[0]
    std = 1.0 / np.abs(layer.prec_sqrt.detach().numpy()[0])
    log_w = torch.log_softmax(layer.weight_logits.detach(), -1).numpy()[0]
    Xt = X[300:340].astype(np.float64)
    comp = np.stack([log_w[k] + norm.logpdf(Xt, mu[k], std[k]).sum(1) for k in range(6)], 1)
    np.testing.assert_allclose(est.score_samples(Xt), comp.max(1), rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(est.score_samples_layers(Xt)[:, 0], comp.max(1), rtol=1e-10)
    np.testing.assert_array_equal(est.predict(Xt), comp.argmax(1))


def test_one_epoch_is_the_reference_sgd_update(digits):
    # one full batch: the optimizer's step must be the reference's plain
    # gradient ascent with per-kind factors, followed by the precision clipping
    X, _ = digits
    X = X[:200].astype(np.float64)
    kw = dict(layers="F-G(4)", batch_size=200, learning_rate=0.3, min_variance=0.5,
              learning_rate_factors=(1.0, 0.5, 0.2), random_state=0, device="cpu")
    start = DCGMMEstimator(max_iter=0, **kw).fit(X)
    stepped = DCGMMEstimator(max_iter=1, **kw).fit(X)
    layer = copy.deepcopy(start.module_.layers[1])
    params = (layer.mu, layer.prec_sqrt, layer.weight_logits)
    x = start.module_.layers[0](torch.as_tensor(X).reshape(-1, 8, 8, 1))
    objective = layer.smoothed_loss(layer.log_scores(x)).mean()
    grads = torch.autograd.grad(objective, params)
    with torch.no_grad():
        for p, g, f in zip(params, grads, (1.0, 0.5, 0.2)):
            p += 0.3 * f * g
        p_sqrt = layer.prec_sqrt.clamp(1e-3, math.sqrt(2.0))
    new = stepped.module_.layers[1]
    assert (new.prec_sqrt == math.sqrt(2.0)).any()  # the projection was active
    torch.testing.assert_close(new.mu, layer.mu)
    torch.testing.assert_close(new.prec_sqrt, p_sqrt)
    torch.testing.assert_close(new.weight_logits, layer.weight_logits)


def test_input_range_is_mapped_to_unit_interval(digits):
    X, _ = digits
    X = X[:300].astype(np.float64)
    kw = dict(max_iter=3, random_state=0, device="cpu", sharpening_iter=0)
    unit = DCGMMEstimator(**kw).fit(X)
    raw = DCGMMEstimator(**kw).fit(255.0 * X - 3.0)  # same fit, other units
    np.testing.assert_allclose(raw.score_samples(255.0 * X - 3.0),
                               unit.score_samples(X) - 64 * math.log(255.0), rtol=1e-6)
    np.testing.assert_allclose(raw.sample(5)[0], 255.0 * unit.sample(5)[0] - 3.0,
                               rtol=1e-6, atol=1e-6)


def test_n_components_fills_layers_without_one(digits):
    X, _ = digits
    est = DCGMMEstimator("F(4,2)-G-F-G(5)", n_components=7, image_shape=(8, 8), max_iter=1,
                         device="cpu").fit(X[:100])
    assert est.layers_ == "F(4,2)-G(7)-F-G(5)"
    assert est.get_params()["layers"] == "F(4,2)-G-F-G(5)"  # the parameter is unchanged


def test_default_fit_on_digits_converges(digits):
    X, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = DCGMMEstimator(random_state=0).fit(X)
    assert est.converged_ and est.n_iter_ < est.max_iter


@pytest.mark.parametrize("n_components", [1, 2])
def test_default_learning_rate_is_stable_for_few_components(digits, n_components):
    # a component that wins every row: the step on its mean has curvature up to
    # 1/min_variance; the defaults keep learning_rate / min_variance <= 1.5
    X, _ = digits
    est = DCGMMEstimator(n_components=n_components, max_iter=4, random_state=0,
                         device="cpu").fit(X)
    assert est.history_[-1]["objective"] > est.history_[0]["objective"]
    assert np.isfinite(est.score_samples(X)).all()


def test_training_improves_every_layer(digits):
    X, _ = digits
    est = DCGMMEstimator("F(3,1)-G(9)-F(2,2)-G(9)-F-G(9)", image_shape=(8, 8), max_iter=6,
                         annealing=0.5, delay=0.2, learning_rate=0.05, min_variance=0.05,
                         random_state=0, device="cpu", tol=0).fit(X[:600])
    hist = est.history_
    assert hist[-1]["loss_G1"] > hist[0]["loss_G1"]
    # every layer's likelihood (given the final lower layers) beats a fresh layer
    trained = est.score_samples_layers(X[:600]).mean(0)
    net = est.module_
    for g, index in enumerate(net.gmm_indices):
        fresh = copy.deepcopy(est)
        layer = ConvGMM(net.layers[index].n_components)
        layer.build(net.shapes[index], generator=torch.Generator().manual_seed(0))
        fresh.module_.layers[index] = layer
        assert fresh.score_samples_layers(X[:600]).mean(0)[g] < trained[g] - 1.0
    assert hist[-1]["sigma_G1"] == pytest.approx(0.01)  # annealed to the minimum
    assert hist[0]["sigma_G3"] == pytest.approx(0.25 * math.sqrt(18))  # not yet started
    # delays: the third layer was still frozen in the first epoch
    assert est.module_.layers[5].n_updates < est.module_.layers[1].n_updates


def test_image_shaped_input_equals_flat(digits):
    X, _ = digits
    kw = dict(max_iter=2, anneal_window=5, random_state=0, device="cpu")
    flat = DCGMMEstimator("F(4,2)-G(4)-F-G(4)", image_shape=(8, 8), **kw).fit(X[:200])
    img = DCGMMEstimator("F(4,2)-G(4)-F-G(4)", **kw).fit(X[:200].reshape(-1, 8, 8))
    assert img.image_shape_ == (8, 8, 1)
    np.testing.assert_allclose(flat.score_samples(X[:20]),
                               img.score_samples(X[:20].reshape(-1, 8, 8, 1)), rtol=1e-5)
    with pytest.raises(ValueError, match="fitted on images of shape"):
        img.score_samples(X[:20].reshape(-1, 4, 16))
    with pytest.raises(ValueError, match="holds images of shape"):
        DCGMMEstimator(image_shape=(4, 16), max_iter=1).fit(X[:50].reshape(-1, 8, 8))


def test_sharpening_increases_target_layer_log_likelihood(digits):
    X, _ = digits
    est = DCGMMEstimator("F(3,1)-G(9)-F-G(16)", image_shape=(8, 8), max_iter=6,
                         annealing=0.5, sampling_divisor=1.0, random_state=0,
                         device="cpu").fit(X[:600])
    net = est.module_
    gen = torch.Generator().manual_seed(0)
    # backward pass of the top layers, then the lowest folding layer, unsharpened
    t, _ = net.layers[3].backwards(None, generator=gen, n_samples=50)
    t = net.layers[2].backwards(t)
    t, _ = net.layers[1].backwards(t, generator=gen, top_s=3, sampling_divisor=1.0)
    x0 = net.layers[0].backwards(t)
    x1 = net._sharpen(0, x0, 1, iterations=100, rate=0.5)
    before = ConvGMM.max_log_likelihood(net.layers[1].log_scores(net.layers[0](x0)))
    after = ConvGMM.max_log_likelihood(net.layers[1].log_scores(net.layers[0](x1)))
    assert (after >= before - 1e-4).all()
    assert after.mean() > before.mean() + 0.5
    # through the estimator: same seed, with and without sharpening
    plain, _ = est.sample(50, sharpening_iter=0)
    sharp, _ = est.sample(50, sharpening_iter=100)
    assert est.score_samples_layers(sharp)[:, 0].mean() > (
        est.score_samples_layers(plain)[:, 0].mean() + 0.5)


def test_sampling_is_seeded_and_shaped(digits):
    X, _ = digits
    est = DCGMMEstimator("F(4,2)-G(9)-F-G(9)", image_shape=(8, 8), max_iter=2,
                         sharpening_iter=5, random_state=3, device="cpu").fit(X[:200])
    a, za = est.sample(7)
    b, zb = est.sample(7)
    assert a.shape == (7, 64) and za.shape == (7,)
    np.testing.assert_array_equal(a, b)
    assert ((za >= 0) & (za < 9)).all()
    with pytest.raises(ValueError, match="needs a classifier"):
        est.sample(3, y=1)
    with pytest.raises(ValueError, match="n_samples"):
        est.sample(0)
    # top_s=1 everywhere and no noise: the most probable top component, decoded
    # deterministically (every layer picks the largest control entry)
    est.set_params(top_s=(1, 1), sampling_divisor=1e9)
    c, zc = est.sample(5)
    top_weights = est.module_.layers[-1].weight_logits.detach()[0]
    np.testing.assert_array_equal(zc, int(top_weights.argmax()))
    np.testing.assert_allclose(c, np.broadcast_to(c[0], c.shape), atol=1e-6)
    with pytest.raises(ValueError, match="one value per G layer"):
        est.set_params(top_s=(1, 1, 1)).fit(X[:100])


def test_inpaint_keeps_known_pixels(supervised_model, digits):
    X, _ = digits
    Xt = X[900:910]
    mask = np.zeros_like(Xt, dtype=bool).reshape(-1, 8, 8)
    mask[:, :, 4:] = True  # right half missing
    mask = mask.reshape(Xt.shape)
    filled = supervised_model.inpaint(Xt, mask)
    assert filled.shape == Xt.shape
    np.testing.assert_array_equal(filled[~mask], Xt[~mask])
    assert np.isfinite(filled).all()
    assert not np.allclose(filled[mask], 0.0)  # something was painted
    img = supervised_model.inpaint(Xt.reshape(-1, 8, 8), mask.reshape(-1, 8, 8))
    assert img.shape == (10, 8, 8)
    with pytest.raises(ValueError, match="mask has shape"):
        supervised_model.inpaint(Xt, mask[:, :10])
    with pytest.raises(TypeError, match="boolean"):
        supervised_model.inpaint(Xt, mask.astype(int))


def test_supervised_fit_predicts_classes_and_samples_them(supervised_model, digits):
    X, y = digits
    est = supervised_model
    assert est.layers_ == "F(3,1)-G(16)-F-G(25)-C"
    np.testing.assert_array_equal(est.classes_, np.arange(10))
    proba = est.predict_proba(X[1000:1200])
    assert proba.shape == (200, 10)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert (est.predict(X[1000:1200]) == y[1000:1200]).mean() > 0.8  # chance: 0.1
    samples, labels = est.sample(20, y=[3] * 10 + [7] * 10)
    assert samples.shape == (20, 64)
    np.testing.assert_array_equal(labels, [3] * 10 + [7] * 10)
    with pytest.raises(ValueError, match="Unknown classes"):
        est.sample(2, y=11)
    # class-conditional samples are recognised by a classifier of real digits
    judge = LogisticRegression(max_iter=300).fit(X, y)
    wanted = np.repeat(np.arange(10), 10)
    samples, _ = est.set_params(top_s=(3, 1)).sample(100, y=wanted)
    assert np.mean(judge.predict(np.clip(samples, 0, 1)) == wanted) > 0.35  # chance: 0.1
    # control signal from p(top component | class) estimated on the training data
    assert est.class_component_proba_.shape == (10, 25)
    np.testing.assert_allclose(est.class_component_proba_.sum(1), 1.0, rtol=1e-4)
    samples, _ = est.set_params(conditional="class_prior", top_s=3).sample(100, y=wanted)
    assert np.mean(judge.predict(np.clip(samples, 0, 1)) == wanted) > 0.35
    est.set_params(top_s=3, conditional="inverse")


def test_string_labels(digits):
    X, y = digits
    names = np.array(list("abcdefghij"))[y[:200]]
    est = DCGMMEstimator("F-G(9)", max_iter=2, anneal_window=5, random_state=0,
                         device="cpu").fit(X[:200], names)
    assert set(est.predict(X[:20])) <= set(names)
    np.testing.assert_array_equal(est.fit_predict(X[:200], names), est.predict(X[:200]))


@parametrize_with_checks(
    [DCGMMEstimator("F-G(3)-G(2)", max_iter=4, batch_size=20, annealing="plateau",
                    anneal_window=5, top_s=(2, 1),
                    sharpening_iter=3, random_state=0, device="cpu")]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
