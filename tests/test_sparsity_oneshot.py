"""One-shot pruning: SparseGPT against a NumPy reference, Wanda's per-output ranking, and both
against magnitude on the layer output and on tiny-lm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink import hessian, models
from jaxshrink.data import get_dataset
from jaxshrink.sparsity import NM, Pruner, oneshot_prune, pruned_masks, sparsegpt, wanda
from jaxshrink.sparsity.oneshot import (
  _oneshot_prune_with_masks,
  _sparsegpt_matrix,
  _sparsegpt_with_masks,
)
from jaxshrink.sparsity.wanda import _wanda_with_masks
from jaxshrink.tree import Rule, flatten

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
  mag = oneshot_prune(params, pruner)
  wa = wanda(_apply, params, batches, pruner)
  sg = sparsegpt(_apply, params, batches, pruner, block_size=16)
  wa_masks, sg_masks = pruned_masks(wa, pruner), pruned_masks(sg, pruner)
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
  pruner = Pruner("d/kernel", 0.75)
  masks = pruned_masks(wanda(_apply, params, [X], pruner, comparison="output"), pruner)
  keep = np.asarray(masks["d"]["kernel"])
  assert (keep.sum(axis=0) == 8).all()
  score = np.abs(W) * np.sqrt((X**2).sum(axis=0))[:, None]
  threshold = np.sort(score, axis=0)[24]
  np.testing.assert_array_equal(keep, score >= threshold[None, :])


def test_wanda_layer_comparison_matches_numpy():
  params = {"d": {"kernel": W}}
  masks = pruned_masks(wanda(_apply, params, [X], Pruner("d/kernel", 0.75)), "d/kernel")
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
      out["mag"].append(_perplexity(model, oneshot_prune(params, pruner), x, y))
      out["wanda"].append(_perplexity(model, wanda(model.apply, params, batches, pruner), x, y))
      pruned = sparsegpt(model.apply, params, batches, pruner)
      out["sparsegpt"].append(_perplexity(model, pruned, x, y))
  for structure, out in ppl.items():
    mag, wanda_ppl, sparsegpt_ppl = (np.array(out[m]) for m in ("mag", "wanda", "sparsegpt"))
    assert np.all(sparsegpt_ppl < 0.98 * mag), (structure, out)
    assert np.all(wanda_ppl < 1.02 * mag), (structure, out)
  assert np.mean(ppl["2:4"]["wanda"]) < np.mean(ppl["2:4"]["mag"]), ppl


# --- one shape: the pruned tree alone; its masks from `pruned_masks` ---


def _digits_mlp_like():
  """digits-mlp's layout with random weights and zero biases (as initialized), and its apply."""
  keys = jax.random.split(jax.random.key(3), 3)
  sizes = ((64, 32), (32, 16), (16, 10))
  params = {
    f"dense{i + 1}": {
      "kernel": jax.random.normal(k, shape) / np.sqrt(shape[0]),
      "bias": jnp.zeros(shape[1]),
    }
    for i, (k, shape) in enumerate(zip(keys, sizes, strict=True))
  }

  def apply(p, x):
    h = x.reshape(x.shape[0], -1)
    for name in ("dense1", "dense2"):
      h = jax.nn.relu(h @ p[name]["kernel"] + p[name]["bias"])
    return h @ p["dense3"]["kernel"] + p["dense3"]["bias"]

  x = jax.random.normal(jax.random.key(4), (96, 8, 8, 1))
  return params, apply, [x[:48], x[48:]]


PRUNERS = {
  "magnitude-50": Pruner(".*kernel", 0.5),
  "magnitude-global-80": Pruner(".*kernel", 0.8, allocation="global"),
  "magnitude-2:4": Pruner(".*kernel", structure="2:4"),
  "magnitude-channel": Pruner("dense[12]/kernel", 0.5, structure="channel"),
  "magnitude-block": Pruner("dense[12]/kernel", 0.5, structure="block"),
  "magnitude-dense-below": Pruner(".*kernel", 0.5, keep_dense_below=1000),
  "wanda-50": Pruner(".*kernel", 0.5),
  "wanda-2:4": Pruner(".*kernel", structure="2:4"),
  "sparsegpt-50": Pruner(".*kernel", 0.5),
  "sparsegpt-2:4": Pruner(".*kernel", structure="2:4"),
}


def _prune_both_ways(name, params, apply, batches):
  """`(public result, (pruned, masks) the method applied)` for the PRUNERS entry `name`."""
  pruner = PRUNERS[name]
  if name.startswith("wanda"):
    return wanda(apply, params, batches, pruner), _wanda_with_masks(apply, params, batches, pruner)
  if name.startswith("sparsegpt"):
    got = sparsegpt(apply, params, batches, pruner, block_size=16)
    return got, _sparsegpt_with_masks(apply, params, batches, pruner, block_size=16)
  return oneshot_prune(params, pruner), _oneshot_prune_with_masks(params, pruner)


@pytest.mark.parametrize("name", list(PRUNERS))
def test_pruning_returns_the_tree_and_pruned_masks_gives_the_applied_masks(name):
  params, apply, batches = _digits_mlp_like()
  got, (want, masks) = _prune_both_ways(name, params, apply, batches)
  assert not isinstance(got, tuple)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for path, leaf in flatten(got).items():
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flatten(want)[path]), err_msg=path)
  read = flatten(pruned_masks(got, PRUNERS[name]))
  applied = flatten(masks)
  assert set(read) == set(applied)
  for path, mask in applied.items():
    assert read[path].dtype == jnp.bool_ and read[path].shape == mask.shape, path
    np.testing.assert_array_equal(np.asarray(read[path]), np.asarray(mask), err_msg=path)
  for path, mask in read.items():  # pruned weights are exactly zero
    leaf = np.asarray(flatten(got)[path])
    assert not leaf[~np.broadcast_to(np.asarray(mask), leaf.shape)].any(), path


def test_pruned_masks_with_a_rule_and_bad_input():
  params, _, _ = _digits_mlp_like()
  pruner = Pruner(".*kernel", 0.5)
  pruned = oneshot_prune(params, pruner)
  by_rule = flatten(pruned_masks(pruned, ".*kernel"))
  by_pruner = flatten(pruned_masks(pruned, pruner))
  for path, mask in by_pruner.items():
    np.testing.assert_array_equal(np.asarray(by_rule[path]), np.asarray(mask), err_msg=path)
  assert by_rule["dense1/bias"].shape == ()  # not selected: a scalar True
  # A kept weight that is exactly 0.0 reads as pruned: zero either way.
  pruned["dense1"]["kernel"] = pruned["dense1"]["kernel"].at[0, 0].set(0.0)
  assert not bool(pruned_masks(pruned, pruner)["dense1"]["kernel"][0, 0])
  with pytest.raises(TypeError, match="`pruned_masks` takes the `Pruner`"):
    pruned_masks(pruned, 0.5)
  with pytest.raises(ValueError, match="matched no parameter"):
    pruned_masks(pruned, "nothing/here")


def test_a_model_in_gives_a_pruned_model_out():
  from flax import nnx

  model = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
  batches = [X[:256], X[256:]]
  pruner = Pruner(".*kernel", 0.5)
  outs = {
    "oneshot_prune": oneshot_prune(model, pruner),
    "wanda": wanda(model, batches, pruner),
    "sparsegpt": sparsegpt(model, batches, pruner, block_size=16),
  }
  for name, out in outs.items():
    assert type(out) is nnx.Linear, name
    assert float(jnp.mean(out.kernel[...] == 0)) == 0.5, name
    masks = pruned_masks(out, pruner)  # a model's masks: its tree's
    np.testing.assert_array_equal(
      np.asarray(flatten(masks)["kernel"]), np.asarray(out.kernel[...] != 0), err_msg=name
    )
  assert float(jnp.mean(model.kernel[...] == 0)) == 0.0  # the user's module is untouched
