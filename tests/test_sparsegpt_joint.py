"""SparseGPT with quantization in the same sweep (`sparsegpt(..., quant=spec)`).

Frantar & Alistarh 2023 (arXiv:2301.00774), section 3.5: when a column is finalized its kept
weights are rounded onto the grid, and the error of pruning and of rounding both go to the
columns not yet visited. Checked against a float64 NumPy reference of one matrix, on a small
MLP against pruning then quantizing (RTN or mask-preserving GPTQ), on a stacked kernel, and on
digits-cnn's test accuracy.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxshrink import models
from jaxshrink.data import get_dataset
from jaxshrink.errors import InvalidTypeError, InvalidValueError
from jaxshrink.quant import QArray, QuantSpec, quantize
from jaxshrink.quant.gptq import gptq, gptq_matrix
from jaxshrink.quant.numerics import compute_qparams, expand_rows
from jaxshrink.quant.spec import LayerQuant
from jaxshrink.sparsity import Pruner, pruned_masks, sparsegpt
from jaxshrink.sparsity.oneshot import _sparsegpt_with_masks
from jaxshrink.tree import flatten, map_selected

# --- one matrix against a float64 reference ------------------------------------------------

K, N, ROWS = 40, 12, 256


class Reference:
  """Joint SparseGPT in float64, one input row at a time, `w` as `(K, N)` (rows = inputs).

  Conventions of `sparsegpt(..., quant=...)`: dead inputs (zero Hessian diagonal) get a unit
  diagonal and a zero weight row; damping `damp · mean(diag H)`; `U` upper with `UᵀU = H⁻¹`.
  Scales are fixed before the sweep (static groups), from the weights plain SparseGPT leaves
  (`sparsegpt` without `quant`, checked in `test_sparsegpt_reference.py`). Unstructured: at
  the start of each block of `B` rows, the `round(p · rows · N)` weights of the block with the
  lowest `w² / U_jj²` are pruned (ties: lower row-major position first). N:M: every M-th row,
  the `M - N` lowest of each column's next M weights, as they are then. Row `j` is coded
  `clip(round(w / s + zp))`, a pruned weight gets the code of 0 (`zp`), and `(w - q) / U_jj`
  times row `j` of `U` is taken off the later rows (at once: lazy batching changes nothing in
  exact arithmetic). It records every ranking gap and rounding tie distance it meets.
  """

  def __init__(self, sparsity, nm, spec):
    self.sparsity, self.nm, self.spec = sparsity, nm, spec
    self.gaps: list[float] = []  # relative gap at each ranking cut
    self.ties: list[float] = []  # distance of each kept rounding to a tie, in code units

  def run(self, w, h, scale, zp, *, damp, block):
    k, n = w.shape
    dead = np.diag(h) == 0
    h = np.where(dead[:, None] | dead[None, :], 0.0, h) + np.diag(dead.astype(float))
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    d = np.diag(u)
    w = np.where(dead[:, None], 0.0, w).astype(np.float64)
    keep = np.ones((k, n), bool)
    codes = np.zeros((k, n), np.int64)
    for b0 in range(0, k, block):
      b1 = min(b0 + block, k)
      if self.nm is None:
        score = ((w[b0:b1] / d[b0:b1, None]) ** 2).ravel()
        drop = round(self.sparsity * score.size)
        order = np.argsort(score, kind="stable")
        self._gap(score[order[drop]], score[order[drop - 1]])
        keep[b0:b1].ravel()[order[:drop]] = False  # a view: the slice is contiguous
      for j in range(b0, b1):
        if self.nm is not None and (j - b0) % self.nm[1] == 0:
          nn, m = self.nm
          for c in range(n):
            score = (w[j : j + m, c] / d[j : j + m]) ** 2
            order = np.argsort(-score, kind="stable")  # the N highest stay, ties: lower first
            self._gap(score[order[nn - 1]], score[order[nn]])
            keep[j + order[nn:], c] = False
        v = w[j] / scale[j] + zp[j]
        inside = (v > self.spec.qmin - 0.5) & (v < self.spec.qmax + 0.5) & keep[j]
        self.ties.extend(np.abs(v - np.floor(v) - 0.5)[inside])
        codes[j] = np.where(keep[j], np.clip(np.round(v), self.spec.qmin, self.spec.qmax), zp[j])
        q = (codes[j] - zp[j]) * scale[j]
        err = (w[j] - q) / u[j, j]
        w[j + 1 :] -= np.outer(u[j, j + 1 :], err)
    return codes, keep

  def _gap(self, high, low):
    self.gaps.append((high - low) / max(high, 1e-30))


def _layer(seed, dead):
  """Correlated `(ROWS, K)` activations with a few loud channels, and `(K, N)` weights."""
  rng = np.random.default_rng(seed)
  gain = rng.uniform(0.3, 2.0, size=K)
  gain[[2, 11, 30]] = 6.0
  x = (rng.normal(size=(ROWS, K)) @ (np.eye(K) + 0.3 * rng.normal(size=(K, K)))) * gain
  x[:, list(dead)] = 0.0
  return x.astype(np.float32), rng.normal(size=(K, N)).astype(np.float32)


def _dense(params, x):
  return x @ params["d"]["kernel"]


CASES = [
  # (structure, sparsity, N:M, spec, block, damp, dead inputs, seed)
  ("unstructured", 0.5, None, QuantSpec(bits=4, group_size=8), 16, 0.01, (), 0),
  ("2:4", 0.5, (2, 4), QuantSpec(bits=3, group_size=8, symmetric=False), 12, 0.01, (7,), 1),
  ("unstructured", 0.6, None, QuantSpec(bits=8, symmetric=False), 12, 0.1, (21,), 2),
]


@pytest.mark.parametrize(
  ("structure", "sparsity", "nm", "spec", "block", "damp", "dead", "seed"),
  CASES,
  ids=[f"{c[0]}-{c[1]}-{c[3].describe()}-block{c[4]}-dead{len(c[6])}" for c in CASES],
)
def test_joint_matches_the_numpy_reference(structure, sparsity, nm, spec, block, damp, dead, seed):
  assert K > block and K % block != 0  # several blocks, the last one shorter
  x, w = _layer(seed, dead)
  params = {"d": {"kernel": jnp.asarray(w)}}
  pruner = Pruner("d/kernel", sparsity, structure=structure)
  tree, masks = _sparsegpt_with_masks(
    _dense, params, [x[:128], x[128:]], pruner, block_size=block, damp=damp, quant=spec
  )
  q = tree["d"]["kernel"]
  assert isinstance(q, QArray) and q.shape == (K, N) and q.bits == spec.bits
  # Scales come from the weights a prune-only pass leaves, before the sweep.
  plain = sparsegpt(_dense, params, [x[:128], x[128:]], pruner, block_size=block, damp=damp)
  scale, zp = compute_qparams(plain["d"]["kernel"], spec)
  np.testing.assert_array_equal(np.asarray(q.scale, np.float32), np.asarray(scale))
  group = spec.group_size
  scale_rows = np.broadcast_to(np.asarray(expand_rows(scale, K, group), np.float64), (K, N))
  zp_rows = np.zeros((K, N)) if zp is None else np.broadcast_to(expand_rows(zp, K, group), (K, N))
  x64 = x.astype(np.float64)
  ref = Reference(sparsity, nm, spec)
  want, keep = ref.run(w, 2.0 / ROWS * x64.T @ x64, scale_rows, zp_rows, damp=damp, block=block)
  # Exact comparison is well-posed: no ranking or rounding sits near a float32 tie.
  assert min(ref.gaps) > 1e-4 and min(ref.ties) > 1e-4, (min(ref.gaps), min(ref.ties))
  got_keep = np.asarray(masks["d"]["kernel"])
  np.testing.assert_array_equal(got_keep, keep)
  np.testing.assert_array_equal(np.asarray(q.unpacked_codes()), want)
  values = np.asarray(q.materialize())
  assert np.all(values[~got_keep] == 0.0)  # pruned: exactly zero, with a zero point too
  assert got_keep.mean() == pytest.approx(1 - sparsity, abs=1 / (N * block))
  for d in dead:  # a dead input's weights carry nothing: pruned first
    assert not got_keep[d].any()
  if nm is not None:
    assert (got_keep.reshape(K // 4, 4, N).sum(axis=1) == 2).all()


def test_no_pruning_is_gptq():
  """At sparsity 0 the joint sweep is GPTQ's per-channel sweep, code for code (and a bare int
  stands for `QuantSpec(bits=b)`)."""
  x, w = _layer(3, ())
  spec = QuantSpec(bits=4)
  tree = sparsegpt(_dense, {"d": {"kernel": jnp.asarray(w)}}, [x], Pruner("d/kernel", 0.0),
                   block_size=16, quant=4)  # fmt: skip
  h = 2.0 / ROWS * jnp.asarray(x).T @ jnp.asarray(x)
  codes, scale, _ = gptq_matrix(jnp.asarray(w), h, spec, block_size=16)
  np.testing.assert_array_equal(np.asarray(tree["d"]["kernel"].unpacked_codes()), codes)
  np.testing.assert_array_equal(np.asarray(tree["d"]["kernel"].scale), scale)


# --- a small MLP: joint against pruning, then quantizing ------------------------------------

D_IN, D_HID, D_OUT = 64, 64, 64  # one shape: one compile serves both layers


def _mlp(params, x):
  return jax.nn.relu(x @ params["fc1"]["kernel"]) @ params["fc2"]["kernel"]


@pytest.fixture(scope="module")
def mlp():
  rng = np.random.default_rng(4)
  mix = np.eye(D_IN) + 0.4 * rng.normal(size=(D_IN, D_IN))
  x = (rng.normal(size=(1024, D_IN)) @ mix * rng.uniform(0.2, 3.0, size=D_IN)).astype(np.float32)
  params = {
    "fc1": {"kernel": jnp.asarray(rng.normal(size=(D_IN, D_HID)) / 8, jnp.float32)},
    "fc2": {"kernel": jnp.asarray(rng.normal(size=(D_HID, D_OUT)) / 10, jnp.float32)},
  }
  return params, [x[:512], x[512:]]


def _layer_errors(params, batches, tree):
  """`||XW - XŴ||` of each layer, on the float model's inputs to that layer."""
  x1 = np.concatenate(batches)
  x2 = np.asarray(jax.nn.relu(x1 @ params["fc1"]["kernel"]))
  flat = flatten(params)
  out = {}
  for name, x in (("fc1", x1), ("fc2", x2)):
    w = flat[f"{name}/kernel"]
    leaf = flatten(tree)[f"{name}/kernel"]
    wq = leaf.materialize() if isinstance(leaf, QArray) else leaf
    out[name] = float(np.linalg.norm(x @ np.asarray(w) - x @ np.asarray(wq)))
  return out


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_joint_beats_prune_then_quantize(mlp, structure):
  """Joint against SparseGPT then RTN, and SparseGPT then mask-preserving GPTQ.

  At int3 rounding costs as much as pruning, and the joint sweep compensates both: lower
  error on every layer (0.93-0.99 of sequential GPTQ over 36 random layers). At int4 rounding
  is small against pruning, and which mask the sweep picks moves the result either way
  (0.97-1.02 of sequential over the same layers, 0.995 on average), so there it must match
  sequential and RTN within 3%.
  """
  params, batches = mlp
  pruner = Pruner("fc.*/kernel", 0.5, structure=structure)
  pruned = sparsegpt(_mlp, params, batches, pruner, block_size=32)
  for bits, slack in ((3, 1.0), (4, 1.03)):
    spec = QuantSpec(bits=bits, group_size=32)
    joint, masks = _sparsegpt_with_masks(_mlp, params, batches, pruner, block_size=32, quant=spec)
    rtn = map_selected(lambda p, w, spec=spec: quantize(w, spec, path=p), pruned, pruner.rule)
    seq = gptq(_mlp, pruned, batches, pruner.rule, spec)  # keeps the exact zeros zero
    errors = {k: _layer_errors(params, batches, t) for k, t in
              {"joint": joint, "rtn": rtn, "gptq": seq}.items()}  # fmt: skip
    for name in ("fc1", "fc2"):
      q, keep = joint[name]["kernel"], np.asarray(masks[name]["kernel"])
      assert isinstance(q, QArray) and (q.bits, q.group_size) == (spec.bits, 32)
      codes = np.asarray(q.unpacked_codes())
      assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
      values = np.asarray(q.materialize())
      assert np.all(values[~keep] == 0.0)
      # On the grid: the decoded values are codes times their group's scale.
      scale = np.repeat(np.asarray(q.scale, np.float32), 32, axis=0)
      np.testing.assert_array_equal(values, codes * scale)
      if structure == "2:4":
        assert (keep.reshape(-1, 4, keep.shape[1]).sum(axis=1) == 2).all()
      else:
        assert keep.mean() == 0.5
      joint_error = errors["joint"][name]
      assert joint_error < slack * errors["rtn"][name], (spec.bits, name, errors)
      assert joint_error < slack * errors["gptq"][name], (spec.bits, name, errors)


def test_bad_quant_names_the_leaf(mlp):
  """Refused before calibrating; a bare int is `QuantSpec(bits=b)` (`test_no_pruning_is_gptq`)."""
  params, batches = mlp
  pruner = Pruner("fc.*/kernel", 0.5)
  with pytest.raises(InvalidValueError, match="Unsupported `bits`=0 for `fc1/kernel`"):
    sparsegpt(_mlp, params, batches, pruner, quant=QuantSpec(bits=0))
  with pytest.raises(InvalidValueError, match="Unsupported `bits`=5 for `fc1/kernel`"):
    sparsegpt(_mlp, params, batches, pruner, quant=5)
  with pytest.raises(InvalidValueError, match="integer codes.*`fc1/kernel`"):
    sparsegpt(_mlp, params, batches, pruner, quant=QuantSpec(format="fp8_e4m3"))
  with pytest.raises(InvalidValueError, match="weights only.*`fc1/kernel`"):
    sparsegpt(_mlp, params, batches, pruner, quant=LayerQuant(QuantSpec(bits=8), 8))
  with pytest.raises(InvalidTypeError, match="got str 'int4'"):
    sparsegpt(_mlp, params, batches, pruner, quant="int4")


# --- a kernel stacked by scan ---------------------------------------------------------------


def test_stacked_kernel_is_quantized_layer_by_layer():
  layers, d = 3, 64  # the MLP's shape and spec: no new compile
  rng = np.random.default_rng(5)
  stacked = jnp.asarray(rng.normal(size=(layers, d, d)) / 6, jnp.float32)

  def scanned(params, x):
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, params["blocks"]["kernel"])[0]

  def unrolled(params, x):
    for layer in params["blocks"]:
      x = jnp.tanh(x @ layer["kernel"])
    return x

  batches = [jnp.asarray(rng.normal(size=(256, d)), jnp.float32)]
  spec = QuantSpec(bits=4, group_size=32)
  pruner = Pruner("blocks.*kernel", structure="2:4")
  got, masks = _sparsegpt_with_masks(
    scanned, {"blocks": {"kernel": stacked}}, batches, pruner, block_size=32, quant=spec
  )
  q = got["blocks"]["kernel"]
  assert isinstance(q, QArray) and q.layers == layers and q.shape == (layers, d, d)
  assert masks["blocks"]["kernel"].shape == (layers, d, d)
  per_layer = {"blocks": [{"kernel": stacked[i]} for i in range(layers)]}
  ref, ref_masks = _sparsegpt_with_masks(
    unrolled, per_layer, batches, pruner, block_size=32, quant=spec
  )
  for i in range(layers):  # layer i sees the float model's inputs, as when unrolled
    np.testing.assert_array_equal(q[i].codes, ref["blocks"][i]["kernel"].codes)
    np.testing.assert_array_equal(q[i].scale, ref["blocks"][i]["kernel"].scale)
    np.testing.assert_array_equal(masks["blocks"]["kernel"][i], ref_masks["blocks"][i]["kernel"])
  assert np.all(np.asarray(q.materialize())[~np.asarray(masks["blocks"]["kernel"])] == 0.0)


# --- digits-cnn ----------------------------------------------------------------------------


def test_digits_cnn_50_percent_int4_g32_loses_at_most_one_point():
  from jaxshrink.evaluation import evaluate_tree

  model = models.get_model("digits-cnn")
  params = models.pretrained(model, progress=False)
  data = get_dataset(model.data)
  batches = [data.x_train[i : i + 256] for i in range(0, 1024, 256)]
  # conv1 (3x3x1 = 9 inputs per output) stays dense: too small to prune.
  pruner = Pruner("conv2/kernel|dense1/kernel|dense2/kernel", 0.5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # every K holds whole groups of 32: no fallback
    joint = sparsegpt(model.apply, params, batches, pruner, quant=QuantSpec(bits=4, group_size=32))
  flat = flatten(joint)
  for path in ("conv2/kernel", "dense1/kernel", "dense2/kernel"):
    values = np.asarray(flat[path].materialize())
    assert isinstance(flat[path], QArray) and np.mean(values == 0) >= 0.5
  assert not isinstance(flat["conv1/kernel"], QArray)
  before, after = evaluate_tree(model, params, data), evaluate_tree(model, joint, data)
  assert after >= before - 0.01, (before, after)


def test_pruned_masks_reads_the_joint_tree(mlp):
  """The public `pruned_masks` decodes the joint tree's QArrays: its masks are the kept weights,
  at most 2 of every 4 along the input axis (a kept weight may round to zero)."""
  params, batches = mlp
  pruner = Pruner("fc.*/kernel", 0.5, structure="2:4")
  joint = sparsegpt(_mlp, params, batches, pruner, block_size=32, quant=4)
  assert isinstance(joint["fc1"]["kernel"], QArray)
  masks = pruned_masks(joint, pruner)
  for name in ("fc1", "fc2"):
    keep = np.asarray(masks[name]["kernel"])
    assert keep.dtype == bool and keep.shape == (D_IN, D_HID)
    assert (keep.reshape(D_IN // 4, 4, -1).sum(axis=1) <= 2).all() and keep.mean() > 0.45
    dense = np.asarray(joint[name]["kernel"].materialize())
    np.testing.assert_array_equal(keep, dense != 0)
