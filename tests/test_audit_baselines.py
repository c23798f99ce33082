"""The baseline filters and ranking metrics, against brute force and scikit-learn."""

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from ecif.audit.baselines import cosine, lemon, loss_mixture, neg_clip_loss
from ecif.audit.metrics import auroc, average_precision, precision_at_k, two_gaussian_mixture


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _pairs(n=120, d=6, seed=0):
    g = np.random.default_rng(seed)
    x = _unit(g.standard_normal((n, d)))
    y = _unit(x + 0.8 * g.standard_normal((n, d)))
    return x.astype(np.float32), y.astype(np.float32)


def test_metrics_match_sklearn():
    g = np.random.default_rng(1)
    labels = g.random(300) < 0.2
    scores = labels * 0.7 + g.standard_normal(300)
    assert np.isclose(auroc(labels, scores), roc_auc_score(labels, scores))
    assert np.isclose(average_precision(labels, scores), average_precision_score(labels, scores))
    top = np.argsort(-scores)[: labels.sum()]
    assert np.isclose(precision_at_k(labels, scores), labels[top].mean())


def test_neg_clip_loss_one_batch_equals_brute_force():
    x, y = _pairs(50)
    t = 20.0
    s = neg_clip_loss(x, y, logit_scale=t, batch=50, repeats=1)
    cos = x @ y.T
    expect = np.empty(50)
    for i in range(50):
        row = np.log(np.exp(t * cos[i]).sum()) / t
        col = np.log(np.exp(t * cos[:, i]).sum()) / t
        expect[i] = -(cos[i, i] - 0.5 * (row + col))
    assert np.allclose(s, expect, atol=1e-5)
    # a pair whose text is close to every image gets a larger normaliser than its cosine
    x2, y2 = x.copy(), y.copy()
    y2[0] = _unit(x.mean(0, keepdims=True))[0]
    assert neg_clip_loss(x2, y2, t, 50, 1)[0] - (1 - cosine(x2, y2)[0]) > s[0] - (1 - cos[0, 0])


def test_lemon_equals_brute_force():
    x, y = _pairs(40, seed=3)
    k, temp = 5, 3.0
    got = lemon(x, y, k=k, temp=temp)
    expect = np.empty(40)
    for i in range(40):
        total = 1 - x[i] @ y[i]
        for a, b in ((x, y), (y, x)):
            sim = a @ a[i]
            sim[i] = -np.inf
            nn = np.argsort(-sim)[:k]
            w = np.exp(-temp * (1 - sim[nn]))
            total += (w * (1 - b[nn] @ b[i])).sum() / w.sum()
        expect[i] = total
    assert np.allclose(got, expect, atol=1e-5)


def test_loss_mixture_finds_the_upper_bump():
    g = np.random.default_rng(0)
    loss = np.r_[g.normal(1, 0.3, 800), g.normal(4, 0.5, 200)]
    post = loss_mixture(loss)
    assert post[800:].mean() > 0.95 and post[:800].mean() < 0.05
    fit = two_gaussian_mixture(loss)
    assert np.allclose(fit.means, [1, 4], atol=0.1) and np.isclose(fit.weights[1], 0.2, atol=0.02)
