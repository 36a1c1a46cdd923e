"""Quantized KV-cache entries: codes and per-token, per-head scales; attention on them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink import kvcache
from jaxshrink.errors import InvalidValueError


@pytest.mark.parametrize("bits, tol", [(8, 0.5 / 127), (4, 0.5 / 7)])
def test_round_trip_error_is_half_a_step_per_token_and_head(bits, tol):
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16)) * jnp.arange(1, 4)[None, None, :, None]
  x = x.at[0, 2, 1].multiply(100.0)  # one outlier token/head coarsens nobody else
  entry = kvcache.write(kvcache.empty(2, 8, 3, 16, bits), x, 1)
  back = np.asarray(kvcache.dequantize(entry))
  assert np.all(back[:, 0] == 0) and np.all(back[:, 6:] == 0)
  absmax = np.abs(np.asarray(x)).max(axis=-1, keepdims=True)
  err = np.abs(back[:, 1:6] - np.asarray(x)) / absmax
  assert err.max() <= tol * 1.02 + 4e-3  # half a step, plus the bf16 scale's rounding


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_on_codes_equals_attention_on_the_dequantized_cache(bits):
  k = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
  v = jax.random.normal(jax.random.key(2), (1, 6, 2, 8))
  keys = kvcache.write(kvcache.empty(1, 6, 2, 8, bits), k, 0)
  values = kvcache.write(kvcache.empty(1, 6, 2, 8, bits), v, 0)
  q = jax.random.normal(jax.random.key(3), (1, 3, 2, 2, 8))
  want = jnp.einsum("btkgd,bskd->bkgts", q, kvcache.dequantize(keys))
  np.testing.assert_allclose(kvcache.scores_with(q, keys), want, rtol=1e-5, atol=1e-5)
  w = jax.nn.softmax(want, axis=-1)
  mixed = jnp.einsum("bkgts,bskd->btkgd", w, kvcache.dequantize(values))
  np.testing.assert_allclose(kvcache.mix_with(w, values), mixed, rtol=1e-5, atol=1e-5)


def test_bytes_per_token_about_halve_a_bf16_cache():
  entry = kvcache.empty(1, 4, 2, 64, 8)
  assert kvcache.nbytes_per_token(entry) == 2 * (64 + 2)
  assert kvcache.nbytes_per_token(kvcache.empty(1, 4, 2, 64, 4)) == 2 * (32 + 2)


def test_unsupported_bits_are_refused():
  with pytest.raises(InvalidValueError, match="`kv_bits` must be one of"):
    kvcache.empty(1, 4, 2, 8, 2)
