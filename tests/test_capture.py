"""Calibration capture: the recorded inputs reproduce each layer's matmul."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxshrink import JaxshrinkError
from jaxshrink.capture import (
  Reducer,
  absmax_reducer,
  collect,
  gram_reducer,
  kernel_matrix,
  minmax_reducer,
  padding,
  sum_squares_reducer,
)
from jaxshrink.errors import InvalidTypeError
from jaxshrink.quant.calibrate import sample_reducer


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=(2, 1), padding="SAME", name="conv")(x)
    x = jax.nn.gelu(x)
    x = nn.DenseGeneral((2, 3), name="query")(x)
    x = nn.DenseGeneral(5, axis=(-2, -1), name="out")(x)
    return jnp.mean(x, axis=(1, 2))


def _last_rows(reducer_name="rows"):
  # Keeps the last batch's x2d so tests can compare against the real layer output.
  return Reducer(init=lambda k: jnp.zeros((0, k)), update=lambda s, x: x)


@pytest.fixture(scope="module")
def setup():
  model = Net()
  x = jax.random.normal(jax.random.key(0), (3, 8, 6, 2))
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, x


def test_dot_general_inputs_reproduce_output(setup):
  model, params, x = setup
  apply = lambda p, x: model.apply({"params": p}, x)
  got = collect(apply, params, [x], ".*kernel", {"rows": _last_rows()})
  _, inter = model.apply({"params": params}, x, capture_intermediates=True)
  query_in = jax.nn.gelu(inter["intermediates"]["conv"]["__call__"][0])
  query_out = inter["intermediates"]["query"]["__call__"][0]
  site = got.sites["query/kernel"]
  assert site.op == "dot_general" and site.contract_dims == (0,) and site.k == 4
  x2d = got.stats["query/kernel"]["rows"]
  w = kernel_matrix(params["query"]["kernel"], site.contract_dims)
  np.testing.assert_allclose(x2d, query_in.reshape(-1, 4), rtol=1e-6)
  np.testing.assert_allclose(
    x2d @ w + params["query"]["bias"].reshape(-1), query_out.reshape(-1, 6), rtol=1e-5, atol=1e-5
  )
  out_site = got.sites["out/kernel"]
  assert out_site.contract_dims == (0, 1) and out_site.k == 6


def test_conv_patches_reproduce_output(setup):
  model, params, x = setup
  apply = lambda p, x: model.apply({"params": p}, x)
  got = collect(apply, params, [x], "conv/kernel", {"rows": _last_rows()})
  site = got.sites["conv/kernel"]
  assert site.op == "conv" and site.k == 3 * 3 * 2
  _, inter = model.apply({"params": params}, x, capture_intermediates=True)
  conv_out = inter["intermediates"]["conv"]["__call__"][0]
  w = kernel_matrix(params["conv"]["kernel"], site.contract_dims)
  np.testing.assert_allclose(
    got.stats["conv/kernel"]["rows"] @ w + params["conv"]["bias"],
    conv_out.reshape(-1, 4),
    rtol=1e-5,
    atol=1e-5,
  )


def test_reducers_stream_over_batches(setup):
  model, params, x = setup
  apply = lambda p, x: model.apply({"params": p}, x)
  batches = [x, 2 * x]
  reducers = {
    "absmax": absmax_reducer(),
    "minmax": minmax_reducer(),
    "sumsq": sum_squares_reducer(),
    "gram": gram_reducer(),
    "rows": _last_rows(),
  }
  got = collect(apply, params, batches, "conv/kernel", reducers).stats["conv/kernel"]
  first = collect(apply, params, [x], "conv/kernel", {"rows": _last_rows()})
  rows1 = first.stats["conv/kernel"]["rows"]
  rows = np.concatenate([rows1, 2 * rows1])
  np.testing.assert_allclose(got["absmax"], np.abs(rows).max(0), rtol=1e-6)
  np.testing.assert_allclose(got["minmax"][0], rows.min(0), rtol=1e-6)
  np.testing.assert_allclose(got["sumsq"][0], (rows**2).sum(0), rtol=1e-5)
  assert float(got["sumsq"][1]) == rows.shape[0]
  np.testing.assert_allclose(got["gram"][0], rows.T @ rows, rtol=1e-4, atol=1e-4)


def test_nnx_model():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(4, 8, rngs=rngs)
      self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.relu(self.fc1(x)))

  graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))
  pure = nnx.to_pure_dict(state)

  def apply(p, x):
    s = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s)(x)

  x = jax.random.normal(jax.random.key(0), (5, 4))
  got = collect(apply, pure, [x], ".*kernel", {"absmax": absmax_reducer()})
  assert set(got.stats) == {"fc1/kernel", "fc2/kernel"}
  np.testing.assert_allclose(got.stats["fc1/kernel"]["absmax"], np.abs(x).max(0), rtol=1e-6)
  hidden = jax.nn.relu(x @ pure["fc1"]["kernel"] + pure["fc1"]["bias"])
  np.testing.assert_allclose(got.stats["fc2/kernel"]["absmax"], np.abs(hidden).max(0), rtol=1e-5)


def test_errors(setup):
  model, params, x = setup
  apply = lambda p, x: model.apply({"params": p}, x)
  with pytest.raises(JaxshrinkError, match="calibration set is empty"):
    collect(apply, params, [], ".*kernel", {"absmax": absmax_reducer()})
  with pytest.raises(JaxshrinkError, match="NaN or Inf"):
    collect(apply, params, [x.at[0, 0, 0, 0].set(jnp.nan)], ".*kernel", {"a": absmax_reducer()})
  with pytest.raises(JaxshrinkError, match="never reach a matmul or conv: query/bias"):
    collect(apply, params, [x], "query/.*", {"a": absmax_reducer()})
  with pytest.raises(JaxshrinkError, match="matched no parameter"):
    collect(apply, params, [x], "nothing", {"a": absmax_reducer()})


def _token_model():
  keys = jax.random.split(jax.random.key(3), 3)
  params = {
    "embed": jax.random.normal(keys[0], (10, 4)),
    "dense": {"kernel": jax.random.normal(keys[1], (4, 3))},
    "flat": {"kernel": jax.random.normal(keys[2], (3, 2))},
  }

  def apply(p, ids):
    h = p["embed"][ids] @ p["dense"]["kernel"]  # (B, T, 3): rows laid out as the tokens
    return h.reshape(-1, 3) @ p["flat"]["kernel"]  # (B * T, 2): the same rows, flattened

  return params, apply


def test_padding_leaves_pad_tokens_out_of_every_statistic():
  params, apply = _token_model()
  ids = jnp.array([[3, 5, 0, 0], [7, 1, 2, 0]], jnp.int32)
  reducers = {
    "gram": gram_reducer(), "absmax": absmax_reducer(), "minmax": minmax_reducer(),
    "squares": sum_squares_reducer(), "sample": sample_reducer(rows=16),
  }  # fmt: skip
  with padding(0):
    found = collect(apply, params, [ids, ids[:1]], ".*kernel", reducers)
  real = np.concatenate([np.asarray(ids)[np.asarray(ids) != 0], [3, 5]])  # both batches
  for path, x in (
    ("dense/kernel", params["embed"][real]),
    ("flat/kernel", params["embed"][real] @ params["dense"]["kernel"]),
  ):
    stats = found.stats[path]
    gram, count = stats["gram"]
    assert float(count) == len(real) == 7
    np.testing.assert_allclose(gram, x.T @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["absmax"], np.abs(x).max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["minmax"][0], x.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["minmax"][1], x.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["squares"][0], (x * x).sum(axis=0), rtol=1e-5)
    buf, kept = stats["sample"]
    assert int(kept) == 7
    np.testing.assert_allclose(buf[:7], x, rtol=1e-6)
  # Outside the block every row counts, padding included; a float input is never masked.
  gram, count = collect(apply, params, [ids], "dense/kernel", {"g": gram_reducer()}).stats[
    "dense/kernel"
  ]["g"]
  assert float(count) == ids.size


def test_padding_needs_an_int_id():
  with pytest.raises(InvalidTypeError, match="`pad_id` must be a token id"):
    with padding("0"):
      pass
