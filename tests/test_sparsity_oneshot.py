"""One-shot pruning: SparseGPT against a NumPy reference, Wanda's per-output ranking, and both
against magnitude on the layer output and on tiny-lm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink import hessian, models
from jaxshrink.data import get_dataset
from jaxshrink.sparsity import NM, Pruner, oneshot_prune, sparsegpt, wanda
from jaxshrink.sparsity.oneshot import _sparsegpt_matrix
from jaxshrink.tree import Rule

RNG = np.random.default_rng(0)
# Correlated inputs with a few loud features: where magnitude pruning goes wrong.
X = RNG.normal(size=(512, 32)) @ RNG.normal(size=(32, 32)) * np.r_[np.full(4, 8.0), np.ones(28)]
X = X.astype(np.float32)
W = RNG.normal(size=(32, 16)).astype(np.float32)


def _apply(p, x):
  return x @ p["d"]["kernel"]


def _sparsegpt_reference(w, u, sparsity):
  """Single-block SparseGPT in NumPy (Frantar & Alistarh, Algorithm 1), rows = outputs."""
  w = w.astype(np.float64).copy()
  score = (w / np.diag(u)[None, :]) ** 2
  drop = round(sparsity * score.size)
  pruned = np.zeros(score.size, bool)
  pruned[np.argsort(score.ravel(), kind="stable")[:drop]] = True
  pruned = pruned.reshape(score.shape)
  for i in range(w.shape[1]):
    q = np.where(pruned[:, i], 0.0, w[:, i])
    err = (w[:, i] - q) / u[i, i]
    w[:, i:] -= err[:, None] * u[i, i:][None, :]
    w[:, i] = q
  return w, ~pruned


def test_sparsegpt_matches_numpy_reference():
  h = hessian.hessian_from_gram(X.T @ X, X.shape[0])
  u = hessian.damped_inverse_cholesky(h)
  ours, keep = _sparsegpt_matrix(jnp.asarray(W.T), u, pruned=0.5, n=0, m=0, block=32)
  ref, ref_keep = _sparsegpt_reference(W.T, np.asarray(u, np.float64), 0.5)
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-3, atol=2e-3)


def _output_error(params):
  return float(np.mean((X @ np.asarray(params["d"]["kernel"]) - X @ W) ** 2))


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_on_layer_output(structure):
  params = {"d": {"kernel": W}}
  pruner = Pruner("d/kernel", 0.5, structure=structure)
  batches = [X[:256], X[256:]]
  mag, _ = oneshot_prune(params, pruner)
  wa, wa_masks = wanda(_apply, params, batches, pruner)
  sg, sg_masks = sparsegpt(_apply, params, batches, pruner, block_size=16)
  errors = {k: _output_error(p) for k, p in (("mag", mag), ("wanda", wa), ("sparsegpt", sg))}
  assert errors["wanda"] < errors["mag"] and errors["sparsegpt"] < errors["wanda"], errors
  for masks in (wa_masks, sg_masks):
    keep = np.asarray(masks["d"]["kernel"])
    if structure == "2:4":
      assert (keep.reshape(8, 4, 16).sum(axis=1) == 2).all()
    else:
      assert (keep.sum(axis=0) == 16).all() or keep.sum() == 256


def test_wanda_ranks_within_each_output():
  params = {"d": {"kernel": W}}
  _, masks = wanda(_apply, params, [X], Pruner("d/kernel", 0.75), comparison="output")
  keep = np.asarray(masks["d"]["kernel"])
  assert (keep.sum(axis=0) == 8).all()
  score = np.abs(W) * np.sqrt((X**2).sum(axis=0))[:, None]
  threshold = np.sort(score, axis=0)[24]
  np.testing.assert_array_equal(keep, score >= threshold[None, :])


def test_wanda_layer_comparison_matches_numpy():
  params = {"d": {"kernel": W}}
  _, masks = wanda(_apply, params, [X], Pruner("d/kernel", 0.75))
  score = np.abs(W) * np.sqrt((X**2).sum(axis=0))[:, None]
  np.testing.assert_array_equal(
    np.asarray(masks["d"]["kernel"]), score >= np.sort(score.ravel())[384]
  )
  with pytest.raises(ValueError, match="'layer' or 'output'"):
    wanda(_apply, params, [X], Pruner("d/kernel", 0.75), comparison="row")


def test_sparsegpt_bad_input():
  params = {"d": {"kernel": W}}
  with pytest.raises(ValueError, match="'unstructured' or 'N:M'"):
    sparsegpt(_apply, params, [X], Pruner("d/kernel", 0.5, structure="channel"))
  with pytest.raises(ValueError, match="not 'global'"):
    wanda(_apply, params, [X], Pruner("d/kernel", 0.5, allocation="global"))
  with pytest.raises(ValueError, match="multiple of M=4"):
    sparsegpt(_apply, params, [X], Pruner("d/kernel", structure="2:4"), block_size=6)
  with pytest.raises(ValueError, match="contracting axis"):
    sparsegpt(_apply, params, [X], Pruner("d/kernel", structure=NM(2, 4, axis=-1)))


@pytest.fixture(scope="module")
def tiny_lm():
  model = models.get_model("tiny-lm")
  return model, models.pretrained(model, progress=False), get_dataset(model.data)


def _perplexity(model, params, x, y):
  logits = jax.jit(model.apply)(params, x)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)
  return float(jnp.exp(nll.mean()))


def test_tiny_lm_reduced_method_ranking_over_seeds(tiny_lm):
  """Only the rankings that held over two other training runs x three window seeds.

  Measured on tiny-lm trained with keys 1 and 2 (the zoo uses key 0), 64 calibration and test
  windows per seed: SparseGPT's perplexity was 0.92-0.94x magnitude's at 50% and about 0.80x
  at 2:4; Wanda's was 0.97-0.99x at 2:4 but 0.985-1.005x at 50% unstructured, so there the two
  are tied and the test asserts only that Wanda is not clearly worse.
  """
  model, params, data = tiny_lm
  # Reduced setting: attention and first MLP layers (K = 192).
  rule = Rule(r"block_\d+/(attention/(query|key|value|out)|mlp/fc1)/kernel")
  ppl = {s: {m: [] for m in ("mag", "wanda", "sparsegpt")} for s in ("unstructured", "2:4")}
  for seed in range(3):
    rng = np.random.default_rng(seed)
    batches = [data.x_train[rng.choice(len(data.x_train), 64, replace=False)]]
    test = rng.choice(len(data.x_test), 64, replace=False)
    x, y = data.x_test[test], data.y_test[test]
    for structure, out in ppl.items():
      pruner = Pruner(rule, 0.5, structure=structure)
      out["mag"].append(_perplexity(model, oneshot_prune(params, pruner)[0], x, y))
      out["wanda"].append(_perplexity(model, wanda(model.apply, params, batches, pruner)[0], x, y))
      pruned = sparsegpt(model.apply, params, batches, pruner)[0]
      out["sparsegpt"].append(_perplexity(model, pruned, x, y))
  for structure, out in ppl.items():
    mag, wanda_ppl, sparsegpt_ppl = (np.array(out[m]) for m in ("mag", "wanda", "sparsegpt"))
    assert np.all(sparsegpt_ppl < 0.98 * mag), (structure, out)
    assert np.all(wanda_ppl < 1.02 * mag), (structure, out)
  assert np.mean(ppl["2:4"]["wanda"]) < np.mean(ppl["2:4"]["mag"]), ppl
