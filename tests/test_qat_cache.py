"""`qat_apply` resolves its layer selection per tree structure and shape, never per `id()`."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxshrink.quant import QuantSpec
from jaxshrink.quant.qat import fake_quant_kernel, qat_apply
from jaxshrink.tree import Rule

X = jax.random.normal(jax.random.key(0), (4, 48))
W = jax.random.normal(jax.random.key(1), (48, 24))
SPEC = QuantSpec(bits=2)


def _apply(params, x):
  return sum(x[:, : w.shape[0]] @ w for w in jax.tree.leaves(params))


def _expected(params, selected):
  """Float model with exactly the `selected` kernels fake-quantized."""
  out = 0.0
  for name, w in params.items():
    w = fake_quant_kernel(w, SPEC, (0,)) if name in selected else w
    out = out + X[:, : w.shape[0]] @ w
  return np.asarray(out)


def test_each_tree_gets_its_own_selection_in_a_loop():
  """Distinct trees built and dropped in a loop: their temporary treedefs' ids get reused (an
  `id()`-keyed cache handed 34 of these 40 trees another tree's selection)."""
  qapply = qat_apply(_apply, Rule(include="a.*"), SPEC)
  for i in range(40):
    # Alternate between two structures: `a{i}` is selected, `b{i}` never is.
    params = {f"a{i}": W} if i % 2 == 0 else {f"b{i}": W, f"a{i}x": W[:16]}
    selected = {name for name in params if name.startswith("a")}
    got = np.asarray(qapply(params, X))
    np.testing.assert_allclose(got, _expected(params, selected), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, np.asarray(_apply(params, X)), atol=1e-3)  # really quantized


def test_same_structure_other_shapes_reselects():
  """A size rule selects by shape: equal treedefs with other leaf shapes are resolved anew."""
  qapply = qat_apply(_apply, Rule(include="v|w", min_size=1000), SPEC)
  big, small = {"v": W, "w": W}, {"v": W, "w": W[:16]}  # w: 1152 vs 384 elements
  assert jax.tree.structure(big) == jax.tree.structure(small)
  for _ in range(2):
    for params, selected in ((big, {"v", "w"}), (small, {"v"})):
      got = np.asarray(qapply(params, X))
      np.testing.assert_allclose(got, _expected(params, selected), rtol=1e-5, atol=1e-5)


def test_cache_under_jit():
  qapply = jax.jit(qat_apply(_apply, "a.*", SPEC))
  for i in range(3):
    params = {f"a{i}": W, "c": W}
    got = np.asarray(qapply(params, X))
    np.testing.assert_allclose(got, _expected(params, {f"a{i}"}), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(qapply(params, X) - _apply(params, X)).max()) > 1e-3
