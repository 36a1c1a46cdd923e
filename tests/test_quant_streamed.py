"""The streamed weight-only matmul (decoding: a few rows) equals the decode-then-multiply one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink.quant.ptq import quantize_params
from jaxshrink.quant.qarray import QArray
from jaxshrink.quant.serve import quantized_apply
from jaxshrink.quant.spec import QuantSpec
from jaxshrink.quant.streamed import chunk_rows, streamed_matmul


def _q(spec: QuantSpec, k=512, n=48, seed=0) -> QArray:
  w = jax.random.normal(jax.random.key(seed), (k, n))
  return quantize_params({"w": w}, ".*", spec)["w"]


@pytest.mark.parametrize(
  "spec",
  [QuantSpec(bits=8), QuantSpec(bits=8, group_size=128, symmetric=False),
   QuantSpec(bits=4, group_size=128), QuantSpec(bits=4, group_size=32, symmetric=False),
   QuantSpec(bits=4), QuantSpec(bits=3, group_size=32, symmetric=False),
   QuantSpec(bits=2, group_size=64)],
)  # fmt: skip
@pytest.mark.parametrize("rows", [1, 5])
def test_streamed_equals_the_decoded_matmul(spec, rows):
  q = _q(spec)
  assert chunk_rows(q) is not None
  x = jax.random.normal(jax.random.key(1), (rows, q.k))
  want = np.asarray(x @ q.dequantized_matrix())
  got = np.asarray(jax.jit(streamed_matmul)(x, q))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_what_cannot_stream_is_decoded():
  assert chunk_rows(_q(QuantSpec(bits=8), k=100)) is None  # K not a whole number of chunks
  assert chunk_rows(_q(QuantSpec(bits=8), k=384)) == 128
  assert chunk_rows(_q(QuantSpec(bits=8), k=64)) is None  # one chunk: nothing to stream
  assert chunk_rows(_q(QuantSpec(bits=8, format="fp8_e4m3"))) is None


def test_serving_a_decoder_step_streams_and_matches_many_rows():
  w = {"w1": jax.random.normal(jax.random.key(0), (256, 384)) / 16,
       "w2": jax.random.normal(jax.random.key(1), (384, 256)) / 16}  # fmt: skip
  ctree = quantize_params(w, ".*", QuantSpec(bits=4, group_size=128))

  def apply(p, x):
    return jax.nn.relu(x @ p["w1"]) @ p["w2"]

  x = jax.random.normal(jax.random.key(2), (40, 256))
  served = jax.jit(quantized_apply(apply))
  many = np.asarray(served(ctree, x))  # 40 rows: decoded once
  one = np.concatenate([np.asarray(served(ctree, x[i : i + 1])) for i in range(3)])
  np.testing.assert_allclose(one, many[:3], rtol=1e-5, atol=1e-5)
  assert jnp.allclose(many, apply(jax.tree.map(lambda q: q.materialize(), ctree,
                                               is_leaf=lambda a: isinstance(a, QArray)), x),
                      atol=1e-5)  # fmt: skip


def test_packed_codes_take_smaller_chunks_on_wide_kernels():
  # An int4 head 1024 x 32000 would unpack 32 MB per 256-row step; it takes 16 rows.
  assert chunk_rows(_q(QuantSpec(bits=4), k=1024, n=4096)) == 128
  assert chunk_rows(_q(QuantSpec(bits=8), k=1024, n=4096)) == 256
  assert chunk_rows(_q(QuantSpec(bits=4, group_size=128), k=1024, n=8192)) == 128
  # int8 too: a 32000-wide head takes 64 rows a step (256 would decode 32 MB per step).
  assert chunk_rows(_q(QuantSpec(bits=8), k=1024, n=32000)) == 64


def test_many_rows_decode_each_kernel_when_its_layer_runs():
  # A prefill (more rows than stream) decodes whole kernels; XLA must not decode every layer's
  # kernel up front, which held all the float weights at once, more than the float model.
  layers = 8
  w = {f"w{i}": jax.random.normal(jax.random.key(i), (512, 512)) / 23 for i in range(layers)}
  ctree = quantize_params(w, ".*", QuantSpec(bits=8))

  def apply(p, x):
    for i in range(layers):
      x = jax.nn.relu(x @ p[f"w{i}"])
    return x

  x = jax.random.normal(jax.random.key(9), (64, 512))
  served = jax.jit(quantized_apply(apply))
  stats = served.lower(ctree, x).compile().memory_analysis()
  float_weights = layers * 512 * 512 * 4
  assert stats.temp_size_in_bytes < float_weights / 2, stats
  dense = jax.tree.map(lambda q: q.materialize(), ctree, is_leaf=lambda a: isinstance(a, QArray))
  np.testing.assert_allclose(served(ctree, x), apply(dense, x), rtol=1e-5, atol=1e-5)
