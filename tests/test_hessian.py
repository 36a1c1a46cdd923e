"""Tests for jaxshrink.hessian: Hessians from calibration, damped inverse Cholesky, retries."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxshrink.errors import JaxshrinkError, NoMatchError
from jaxshrink.hessian import collect_hessians, damped_inverse_cholesky, hessian_from_gram


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, name="fc1")(x))
    return nn.Dense(3, name="fc2")(x)


@pytest.fixture(scope="module")
def mlp():
  module = _MLP()
  params = module.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
  batches = [np.asarray(jax.random.normal(jax.random.key(i), (7, 5)), np.float32) for i in (1, 2)]
  return module, params, batches


def _reference_upper(h, damp):
  h = np.asarray(h, np.float64).copy()
  dead = np.diag(h) == 0
  h[dead, :] = 0
  h[:, dead] = 0
  h[dead, dead] = 1
  h += damp * np.mean(np.diag(h)) * np.eye(len(h))
  return np.linalg.cholesky(np.linalg.inv(h)).T


def test_hessian_from_gram_matches_numpy():
  x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
  h = jax.jit(hessian_from_gram)(x.T @ x, 10.0)
  np.testing.assert_allclose(h, 2.0 / 10 * x.T.astype(np.float64) @ x, rtol=1e-5)
  assert h.dtype == jnp.float32


def test_hessian_from_gram_rejects_zero_count():
  with pytest.raises(JaxshrinkError, match="at least one calibration batch"):
    hessian_from_gram(jnp.zeros((2, 2)), 0)


def test_collect_hessians_matches_numpy(mlp):
  module, params, batches = mlp
  hessians = collect_hessians(
    lambda p, x: module.apply({"params": p}, x), params, iter(batches), ".*kernel"
  )
  assert sorted(hessians) == ["fc1/kernel", "fc2/kernel"]
  x = np.concatenate(batches).astype(np.float64)
  hidden = np.maximum(
    x @ np.asarray(params["fc1"]["kernel"]) + np.asarray(params["fc1"]["bias"]), 0
  )
  for path, inputs in (("fc1/kernel", x), ("fc2/kernel", hidden)):
    h, site = hessians[path]
    assert h.shape == (inputs.shape[1],) * 2 and h.dtype == jnp.float32
    assert site.path == path and site.contract_dims == (0,)
    np.testing.assert_allclose(h, 2.0 / 14 * inputs.T @ inputs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.5])
def test_damped_inverse_cholesky_matches_numpy(damp):
  x = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
  h = 2.0 / 40 * x.T @ x
  u = damped_inverse_cholesky(jnp.asarray(h), damp=damp)
  np.testing.assert_allclose(u, _reference_upper(h, damp), rtol=2e-4, atol=1e-5)
  assert np.all(np.tril(np.asarray(u), -1) == 0)


def test_dead_inputs_get_unit_diagonal():
  h = np.diag([4.0, 0.0, 1.0]).astype(np.float32)
  h[0, 2] = h[2, 0] = 0.5
  u = np.asarray(damped_inverse_cholesky(jnp.asarray(h), damp=0.0))
  assert np.all(np.isfinite(u))
  np.testing.assert_allclose(u, _reference_upper(h, 0.0), rtol=1e-5, atol=1e-6)
  assert u[1, 1] == pytest.approx(1.0) and u[0, 1] == 0 and u[1, 2] == 0


@settings(max_examples=10, deadline=None)
@given(k=st.sampled_from([1, 4, 12]), rows=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_inverse_cholesky_is_a_factor_of_the_damped_inverse(k, rows, seed):
  x = np.random.default_rng(seed).normal(size=(rows, k)).astype(np.float32)
  h = 2.0 / rows * x.T @ x
  u = np.asarray(damped_inverse_cholesky(jnp.asarray(h), damp=0.1), np.float64)
  damped = h + 0.1 * np.mean(np.diag(h)) * np.eye(k)
  np.testing.assert_allclose(u.T @ u @ damped, np.eye(k), atol=2e-3)


def test_singular_hessian_is_retried_with_more_damping():
  h = jnp.ones((3, 3), jnp.float32)  # rank 1: plain Cholesky hits a zero pivot
  with pytest.warns(
    UserWarning, match=r"`blk/kernel` failed with damp=0; succeeded with damp=0.01"
  ):
    u = damped_inverse_cholesky(h, damp=0.0, path="blk/kernel")
  np.testing.assert_allclose(u, _reference_upper(np.ones((3, 3)), 0.01), rtol=1e-3)


def test_indefinite_hessian_raises_naming_the_layer():
  h = jnp.asarray([[1.0, 3.0], [3.0, 1.0]])  # eigenvalue -2: only damp > 2 makes it definite
  with pytest.raises(JaxshrinkError, match=r"`head/kernel` failed 2 times \(damp 0.01, 0.1\).*"):
    damped_inverse_cholesky(h, path="head/kernel", max_tries=2)
  with pytest.warns(UserWarning, match="succeeded with damp=10"):
    damped_inverse_cholesky(h, path="head/kernel", max_tries=4)


def test_nan_hessian_names_the_path():
  h = jnp.eye(3).at[1, 2].set(jnp.nan)
  with pytest.raises(JaxshrinkError, match="Hessian of `block_0/mlp/fc1/kernel` holds NaN"):
    damped_inverse_cholesky(h, path="block_0/mlp/fc1/kernel")


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [({"damp": -1.0}, "`damp` must be a finite float >= 0"), ({"max_tries": 0}, "`max_tries`")],
)
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    damped_inverse_cholesky(jnp.eye(2), **kwargs)
  with pytest.raises(ValueError, match=r"square \(K, K\)"):
    damped_inverse_cholesky(jnp.ones((2, 3)))


def test_collect_hessians_bad_calibration(mlp):
  module, params, batches = mlp

  def apply(p, x):
    return module.apply({"params": p}, x)

  with pytest.raises(JaxshrinkError, match="calibration set is empty"):
    collect_hessians(apply, params, [], ".*kernel")
  with pytest.raises(JaxshrinkError, match="NaN or Inf"):
    collect_hessians(apply, params, [batches[0] * np.nan], ".*kernel")
  with pytest.raises(NoMatchError, match="fc1/kernel"):
    collect_hessians(apply, params, batches, "conv.*")
