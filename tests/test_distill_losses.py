"""Distillation losses against NumPy references, masks, jit/grad, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxshrink.distill import (
  DistillLoss,
  FeaturePair,
  attention_transfer_loss,
  cosine_embedding_loss,
  feature_loss,
  hard_target_loss,
  init_projection,
  kd_loss,
  logit_mse_loss,
  soft_target_loss,
)


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_soft(s, t, temp, mask=None):
  ls, lt = np_log_softmax(s / temp), np_log_softmax(t / temp)
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  w = np.ones(kl.shape) if mask is None else np.broadcast_to(mask, kl.shape).astype(float)
  return temp**2 * (kl * w).sum() / w.sum()


RNG = np.random.default_rng(0)
S = RNG.normal(size=(4, 6, 11)).astype(np.float32) * 3
T = RNG.normal(size=(4, 6, 11)).astype(np.float32) * 3
MASK = np.arange(6)[None, :] < np.array([6, 3, 1, 5])[:, None]  # (B, T) bool padding mask
LABELS = RNG.integers(0, 11, size=(4, 6)).astype(np.int32)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 8.0])
def test_soft_target_matches_numpy_under_jit(temperature):
  got = jax.jit(lambda s, t, m: soft_target_loss(s, t, temperature=temperature, mask=m))(S, T, MASK)
  np.testing.assert_allclose(got, np_soft(S, T, temperature, MASK), rtol=1e-5)
  np.testing.assert_allclose(soft_target_loss(S, T, temperature=temperature),
                             np_soft(S, T, temperature), rtol=1e-5)  # fmt: skip


def test_soft_target_is_stable_for_huge_logits():
  s = jnp.array([[1e4, -1e4, 0.0]])
  t = jnp.array([[-1e4, 1e4, 0.0]])
  value = soft_target_loss(s, t, temperature=1.0)
  assert np.isfinite(value) and value > 1e3
  grad = jax.grad(lambda s: soft_target_loss(s, t, temperature=2.0))(s)
  assert np.all(np.isfinite(grad))


def test_soft_target_gradient_scales_like_hinton():
  # d/ds of T² KL = T (softmax(s/T) - softmax(t/T)): the T² keeps the scale ~ 1/T · T² = T.
  s, t = S[0, :1], T[0, :1]
  grad = jax.grad(lambda s: soft_target_loss(s, t, temperature=4.0))(s)
  ps = np.exp(np_log_softmax(s / 4.0))
  pt = np.exp(np_log_softmax(t / 4.0))
  np.testing.assert_allclose(grad, 4.0 * (ps - pt), rtol=1e-4, atol=1e-6)


def test_masked_positions_do_not_matter():
  garbage_s = np.where(MASK[..., None], S, 1e6).astype(np.float32)
  np.testing.assert_allclose(
    soft_target_loss(garbage_s, T, temperature=2.0, mask=MASK),
    soft_target_loss(S, T, temperature=2.0, mask=MASK),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    hard_target_loss(garbage_s, LABELS, mask=MASK), hard_target_loss(S, LABELS, mask=MASK)
  )


def test_kd_mixes_hard_and_soft():
  hard = hard_target_loss(S, LABELS, mask=MASK)
  soft = soft_target_loss(S, T, temperature=3.0, mask=MASK)
  got = kd_loss(S, T, LABELS, temperature=3.0, alpha=0.25, mask=MASK)
  np.testing.assert_allclose(got, 0.25 * soft + 0.75 * hard, rtol=1e-6)
  ls = np_log_softmax(S)
  nll = -np.take_along_axis(ls, LABELS[..., None], -1)[..., 0]
  np.testing.assert_allclose(hard, (nll * MASK).sum() / MASK.sum(), rtol=1e-5)


def test_logit_mse_and_cosine_match_numpy():
  mse = ((S - T) ** 2).mean(-1)
  np.testing.assert_allclose(
    logit_mse_loss(S, T, mask=MASK), (mse * MASK).sum() / MASK.sum(), rtol=1e-5
  )
  cos = (S * T).sum(-1) / (np.linalg.norm(S, axis=-1) * np.linalg.norm(T, axis=-1))
  np.testing.assert_allclose(
    cosine_embedding_loss(S, T, mask=MASK), ((1 - cos) * MASK).sum() / MASK.sum(), rtol=1e-5
  )


def test_feature_loss_with_projection_matches_numpy():
  hs = RNG.normal(size=(4, 6, 8)).astype(np.float32)
  ht = RNG.normal(size=(4, 6, 16)).astype(np.float32)
  proj = init_projection(jax.random.key(1), 8, 16)
  want = ((hs @ np.asarray(proj["kernel"]) - ht) ** 2).mean(-1)
  got = jax.jit(lambda p: feature_loss(hs, ht, projection=p, mask=MASK))(proj)
  np.testing.assert_allclose(got, (want * MASK).sum() / MASK.sum(), rtol=1e-5)
  grads = jax.grad(lambda p: feature_loss(hs, ht, projection=p, mask=MASK))(proj)
  assert grads["kernel"].shape == (8, 16) and np.any(grads["kernel"] != 0)


def test_attention_transfer_matches_numpy_with_padding():
  a_s = np.asarray(jax.nn.softmax(RNG.normal(size=(4, 2, 6, 6)), -1), np.float32)
  a_t = np.asarray(jax.nn.softmax(RNG.normal(size=(4, 2, 6, 6)), -1), np.float32)
  terms = a_t * (np.log(a_t) - np.log(a_s))
  terms = terms * MASK[:, None, None, :]
  per_query = terms.sum(-1)
  w = np.broadcast_to(MASK[:, None, :], per_query.shape)
  want = (per_query * w).sum() / w.sum()
  np.testing.assert_allclose(attention_transfer_loss(a_s, a_t, mask=MASK), want, rtol=1e-5)
  assert float(attention_transfer_loss(a_t, a_t)) == pytest.approx(0.0, abs=1e-7)


_SOFT = jax.jit(lambda s, t, temp: soft_target_loss(s, t, temperature=temp))


@settings(deadline=None, max_examples=15)
@given(st.integers(0, 2**31 - 1), st.floats(0.5, 10.0), st.floats(-20, 20))
def test_soft_target_properties(seed, temperature, shift):
  # Fixed shapes so the jitted loss compiles once; values and temperature vary.
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(3, 7)).astype(np.float32) * 4
  t = rng.normal(size=(3, 7)).astype(np.float32) * 4
  value = float(_SOFT(s, t, temperature))
  assert value >= -1e-5  # KL is non-negative
  assert float(_SOFT(t, t, temperature)) == pytest.approx(0, abs=1e-5)
  # Softmax ignores a constant shift of the logits.
  assert float(_SOFT(s + shift, t, temperature)) == pytest.approx(value, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature):
  with pytest.raises(ValueError, match="`temperature` must be > 0"):
    soft_target_loss(S, T, temperature=temperature)
  with pytest.raises(ValueError, match="`temperature` must be > 0"):
    DistillLoss(temperature=temperature)


def test_logits_of_different_shapes():
  with pytest.raises(ValueError, match=r"same shape; got student \(4, 6, 11\) and teacher"):
    soft_target_loss(S, T[..., :10], temperature=2.0)
  with pytest.raises(ValueError, match="same shape"):
    logit_mse_loss(S, T[:2])
  with pytest.raises(ValueError, match="same shape"):
    DistillLoss().init(jax.random.key(0), S, T[..., :10])


def test_feature_pair_that_cannot_be_projected():
  hs, ht = jnp.ones((4, 6, 8)), jnp.ones((4, 6, 16))
  with pytest.raises(ValueError, match=r"student width 8 != teacher width 16.*init_projection"):
    feature_loss(hs, ht)
  with pytest.raises(ValueError, match=r"projection kernel has shape \(8, 8\).*\(8, 16\)"):
    feature_loss(hs, ht, projection=init_projection(jax.random.key(0), 8, 8))
  with pytest.raises(ValueError, match="same leading"):
    feature_loss(jnp.ones((4, 5, 8)), ht, projection=init_projection(jax.random.key(0), 8, 16))
  loss = DistillLoss(pairs=(FeaturePair("h", "h", kind="cosine"),))
  with pytest.raises(ValueError, match=r"needs equal shapes.*Only `mse` pairs learn"):
    loss.init(jax.random.key(0), {"logits": S, "h": hs}, {"logits": S, "h": ht})
  with pytest.raises(ValueError, match="has no `h`"):
    loss.init(jax.random.key(0), {"logits": S}, {"logits": S, "h": ht})


def test_other_bad_inputs():
  with pytest.raises(ValueError, match=r"`alpha`.*\[0, 1\]"):
    kd_loss(S, T, LABELS, alpha=1.5)
  with pytest.raises(TypeError, match="bool"):
    soft_target_loss(S, T, mask=MASK.astype(np.float32))
  with pytest.raises(ValueError, match="prefix"):
    soft_target_loss(S, T, mask=MASK[:, :3])
  with pytest.raises(ValueError, match="kind"):
    FeaturePair("a", "b", kind="l1")
  with pytest.raises(ValueError, match="without a `logits`"):
    DistillLoss().init(jax.random.key(0), {"h": S}, T)
