"""Layers stacked by `nn.scan` / `nnx.scan` (the usual LLM layout) are followed.

Every technique treats layer `i` of a stacked kernel as its own kernel: the scanned model gives
exactly what the same model written as a Python loop over layers gives (same statistics, same
codes, scales and masks per layer), and serving and QAT run each layer's own scales inside the
scan. What the replay cannot follow raises an error naming the leaf and the primitive: no
kernel runs in float silently.
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxshrink as js
from jaxshrink import serving
from jaxshrink.capture import ControlFlowError, absmax_reducer, collect, find_sites
from jaxshrink.encoding import materialize
from jaxshrink.quant import LayerQuant, QuantSpec, qat_apply, quantized_apply
from jaxshrink.quant.qarray import QArray, stack
from jaxshrink.quant.serve import IntegerPathError
from jaxshrink.sparsity import NM, Pruner, pruned_masks, sparsegpt, wanda
from jaxshrink.tree import flatten

D, HEADS, LAYERS = 32, 2, 2


class LinenBlock(nn.Module):
  """A pre-norm transformer block: attention, then an MLP."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)(h, h)
    x = x + h
    h = nn.Dense(2 * D, name="fc1")(nn.LayerNorm()(x))
    return x + nn.Dense(D, name="fc2")(nn.gelu(h))


class LinenScanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)

    class Step(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return LinenBlock(name="block")(x), None

    layers = nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)(
      name="layers"
    )
    x, _ = layers(x, None)
    return nn.Dense(4, name="head")(x)


def linen_unrolled(params, x):
  """The same network as a Python loop over per-layer params `params["layers"][i]`."""
  x = nn.Dense(D).apply({"params": params["embed"]}, x)
  for layer in params["layers"]:
    x = LinenBlock().apply({"params": layer["block"]}, x)
  return nn.Dense(4).apply({"params": params["head"]}, x)


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm1 = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, D, qkv_features=D, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(D, rngs=rngs)
    self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
    self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

  def __call__(self, x):
    h = self.norm1(x)
    x = x + self.attn(h, h)
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class NnxScanned(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(8, D, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NnxBlock(rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(self.embed(x), self.layers))


def _nnx_models():
  model = NnxScanned(nnx.Rngs(0))
  graph, state = nnx.split(model)
  block_graph, _ = nnx.split(NnxBlock(nnx.Rngs(1)))
  embed_graph, _ = nnx.split(model.embed)
  head_graph, _ = nnx.split(model.head)

  def merge(graph_def, pure):  # a pure dict of arrays -> the module
    return nnx.merge(graph_def, nnx.State(pure))

  def scanned(params, x):
    return merge(graph, params)(x)

  def unrolled(params, x):
    x = merge(embed_graph, params["embed"])(x)
    for layer in params["layers"]:
      x = merge(block_graph, layer)(x)
    return merge(head_graph, params["head"])(x)

  params = nnx.to_pure_dict(state)
  return scanned, unrolled, params


def _linen_models():
  model = LinenScanned()
  params = model.init(jax.random.key(0), jnp.ones((2, 4, 8)))["params"]
  return (lambda p, x: model.apply({"params": p}, x)), linen_unrolled, params


def unroll(tree, stacked: str):
  """`tree` with the stacked subtree `stacked` split into a list of per-layer subtrees
  (a stacked QArray into its layers `q[i]`, a stacked array into `a[i]`)."""
  is_q = lambda x: isinstance(x, QArray)  # noqa: E731
  layers = [jax.tree.map(lambda a, i=i: a[i], tree[stacked], is_leaf=is_q) for i in range(LAYERS)]
  return {**tree, stacked: layers}


MODELS = {"linen": _linen_models, "nnx": _nnx_models}
STACK = {"linen": "layers/block/fc1/kernel", "nnx": "layers/fc1/kernel"}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
  scanned, unrolled, params = MODELS[request.param]()
  batches = [jax.random.normal(jax.random.key(i), (2, 4, 8)) for i in range(2)]
  return request.param, scanned, unrolled, params, batches


RULE = ".*(fc1|fc2|query|key|value|out)/kernel"


def _assert_per_layer(name, got, ref):
  """Layer `i` of the scanned result equals the unrolled model's layer `i` result."""
  for i in range(LAYERS):
    want = ref[i]
    have = got[i]
    if isinstance(want, QArray):
      np.testing.assert_array_equal(np.asarray(have.codes), np.asarray(want.codes), err_msg=name)
      np.testing.assert_allclose(have.scale, want.scale, rtol=1e-6, err_msg=name)
      for field in ("input_scale", "act_scale", "zero_point"):
        a, b = getattr(have, field), getattr(want, field)
        assert (a is None) == (b is None), (name, field)
        if a is not None:
          np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=f"{name} {field}")
    else:
      np.testing.assert_array_equal(np.asarray(have), np.asarray(want), err_msg=name)


def _stacked(kind, tree):
  flat = flatten(tree)
  return flat[STACK[kind]]


def _layer_leaf(kind, tree, i):
  sub = STACK[kind].removeprefix("layers/")
  return flatten(tree["layers"][i])[sub]


WANDA = Pruner(RULE, sparsity=0.5)
SPARSEGPT = Pruner(".*(fc1|fc2)/kernel", sparsity=0.5, structure=NM(2, 4, axis=-2))
METHODS = {
  "ptq-w8a8": lambda f, p, b: js.ptq(f, p, b, RULE, QuantSpec(bits=8), activation_bits=8),
  "ptq-static-smooth": lambda f, p, b: js.ptq(
    f,
    p,
    b,
    RULE,
    QuantSpec(bits=8),
    activation_bits=8,
    static_activations=True,
    smooth_alpha=0.5,
  ),  # fmt: skip
  "gptq-int4-g32": lambda f, p, b: js.gptq(f, p, b, RULE, QuantSpec(bits=4, group_size=32)),
  "awq-int4": lambda f, p, b: js.awq(f, p, b, RULE, QuantSpec(bits=4, group_size=32), grid=5),
  "wanda-50": lambda f, p, b: pruned_masks(wanda(f, p, b, WANDA), WANDA),
  "sparsegpt-2:4": lambda f, p, b: pruned_masks(sparsegpt(f, p, b, SPARSEGPT), SPARSEGPT),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_layer_of_a_stack_is_its_own_kernel(model, method):
  kind, scanned, unrolled, params, batches = model
  got = METHODS[method](scanned, params, batches)
  ref = METHODS[method](unrolled, unroll(params, "layers"), batches)
  stacked = _stacked(kind, got)
  if isinstance(stacked, QArray):
    assert stacked.layers == LAYERS and stacked.shape == (LAYERS, D, 2 * D)
    assert stacked.scale.shape[0] == LAYERS
    # Own scales per layer: no two layers share them.
    assert not np.allclose(stacked.scale[0], stacked.scale[1])
    per_layer = [stacked[i] for i in range(LAYERS)]
  else:  # a stacked bool mask
    assert stacked.shape == (LAYERS, D, 2 * D) and stacked.dtype == jnp.bool_
    per_layer = list(stacked)
    for layer in per_layer:  # every layer pruned to exactly half on its own
      assert int(layer.sum()) == layer.size // 2
  _assert_per_layer(method, per_layer, [_layer_leaf(kind, ref, i) for i in range(LAYERS)])


def test_collect_gives_statistics_per_layer(model):
  kind, scanned, unrolled, params, batches = model
  got = collect(scanned, params, batches, RULE, {"absmax": absmax_reducer()})
  ref = collect(unrolled, unroll(params, "layers"), batches, RULE, {"absmax": absmax_reducer()})
  site = got.sites[STACK[kind]]
  assert site.layers == LAYERS and site.contract_dims == (0,) and site.k == D
  stats = got.stats[STACK[kind]]["absmax"]
  assert stats.shape == (LAYERS, D)
  for i in range(LAYERS):
    path = f"layers/{i}/{STACK[kind].removeprefix('layers/')}"
    np.testing.assert_allclose(stats[i], ref.stats[path]["absmax"], rtol=1e-6)


@pytest.mark.parametrize("method", ["ptq-w8a8", "ptq-static-smooth", "gptq-int4-g32"])
def test_serving_runs_each_layer_with_its_own_scales(model, method):
  kind, scanned, unrolled, params, batches = model
  ctree = METHODS[method](scanned, params, batches)
  flat_ref = unroll(ctree, "layers")
  x = batches[0]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no kernel leaves the integer path
    got = jax.jit(quantized_apply(scanned, strict=True))(ctree, x)
    want = jax.jit(quantized_apply(unrolled, strict=True))(flat_ref, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for mode in ("integer", "bfloat16"):
    got = serving.serve(scanned, ctree, mode)(x)
    want = serving.serve(unrolled, flat_ref, mode)(x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3, err_msg=mode)


def test_integer_path_runs_inside_the_rolled_scan(model):
  kind, scanned, _, params, batches = model
  ctree = METHODS["ptq-w8a8"](scanned, params, batches)
  text = jax.jit(quantized_apply(scanned, strict=True)).lower(ctree, batches[0]).as_text()
  int8_dots = re.findall(r"dot_general.*tensor<[^>]*xi8>.*-> tensor<[^>]*xi32>", text)
  # The scan stays one loop, whose body holds each selected kernel's int8 x int8 -> int32 dot
  # (q, k, v, out, fc1, fc2) once, whatever the number of layers.
  assert text.count("stablehlo.while") == 1 and len(int8_dots) == 6


def test_quantize_params_with_sites_gives_per_layer_scales(model):
  kind, scanned, unrolled, params, batches = model
  sites = find_sites(scanned, params, batches[0], rule=RULE)
  assert sites[STACK[kind]].layers == LAYERS
  spec = LayerQuant(QuantSpec(bits=8), 8)
  tree = js.quantize_params(params, RULE, spec, contract_dims=sites)
  q = _stacked(kind, tree)
  assert q.layers == LAYERS and q.scale.shape == (LAYERS, 1, 2 * D)
  for i in range(LAYERS):
    layer = js.quantize(flatten(params)[STACK[kind]][i], QuantSpec(bits=8))
    np.testing.assert_array_equal(q[i].codes, layer.codes)
  out = jax.jit(quantized_apply(scanned, strict=True))(tree, batches[0])
  ref = jax.jit(quantized_apply(unrolled, strict=True))(unroll(tree, "layers"), batches[0])
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_a_stack_quantized_without_its_layer_axis_is_named(model):
  kind, scanned, _, params, batches = model
  tree = js.quantize_params(params, RULE, LayerQuant(QuantSpec(bits=8), 8))
  with pytest.raises(IntegerPathError, match=rf"`{STACK[kind]}`.*inside `scan`.*layer axis"):
    quantized_apply(scanned, strict=True)(tree, batches[0])


def test_qat_quantizes_each_layer_inside_the_scan(model):
  kind, scanned, unrolled, params, batches = model
  spec = LayerQuant(QuantSpec(bits=4, group_size=32), 8)
  got = jax.jit(qat_apply(scanned, RULE, spec))(params, batches[0])
  want = jax.jit(qat_apply(unrolled, RULE, spec))(unroll(params, "layers"), batches[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  float_out = scanned(params, batches[0])
  assert float(jnp.max(jnp.abs(got - float_out))) > 1e-4  # really quantized
  grads = jax.grad(lambda p: jnp.sum(qat_apply(scanned, RULE, spec)(p, batches[0]) ** 2))(params)
  assert _stacked(kind, grads).shape == (LAYERS, D, 2 * D)


# --- control flow the replay cannot follow, and cond/while that it follows ---


def _nested(params, x):
  """A stack of stacks: layer (i, j) is `w[i][j]`; the inner scan gets a layer of a layer."""

  def outer(x, w_i):
    return lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, w_i)[0], None

  return lax.scan(outer, x, params["w"])[0]


NESTED = {"w": jax.random.normal(jax.random.key(3), (2, 2, 8, 8)) / 3}


def test_collect_names_a_kernel_it_cannot_follow():
  with pytest.raises(ControlFlowError, match=r"`w` \(through `scan`\)"):
    collect(_nested, NESTED, [jnp.ones((4, 8))], "w", {"absmax": absmax_reducer()})


def test_quantized_apply_names_a_kernel_it_cannot_follow():
  spec = LayerQuant(QuantSpec(bits=8), 8)
  tree = js.quantize_params(NESTED, "w", spec, contract_dims={"w": (2,)})
  with pytest.raises(IntegerPathError, match=r"`w`.*`scan`"):
    quantized_apply(_nested, strict=True)(tree, jnp.ones((4, 8)))


def test_qat_names_a_kernel_it_cannot_follow():
  apply = qat_apply(_nested, "w", QuantSpec(bits=8))
  with pytest.raises(ControlFlowError, match=r"`w` \(through `scan`\).*train in float"):
    jax.jit(apply)(NESTED, jnp.ones((4, 8)))


def _branchy(params, x, flag):
  def loop(x):
    return lax.fori_loop(0, flag + 1, lambda _, x: jnp.tanh(x @ params["b"]), x)

  return lax.cond(flag > 0, lambda x: x @ params["a"], loop, x)


BRANCHY = {
  "a": jax.random.normal(jax.random.key(4), (8, 8)) / 3,
  "b": jax.random.normal(jax.random.key(5), (8, 8)) / 3,
}


@pytest.mark.parametrize("flag", [0, 1])
def test_cond_and_while_are_followed_by_serving_and_qat(flag):
  x = jax.random.normal(jax.random.key(6), (4, 8))
  tree = js.quantize_params(BRANCHY, ".*", LayerQuant(QuantSpec(bits=8), 8))
  got = jax.jit(quantized_apply(_branchy, strict=True))(tree, x, flag)

  def unrolled(params, x):  # the branch taken, without control flow
    if flag:
      return x @ params["a"]
    return jnp.tanh(x @ params["b"])

  want = jax.jit(quantized_apply(unrolled, strict=True))(tree, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  qat = jax.jit(qat_apply(_branchy, ".*", QuantSpec(bits=4)))(BRANCHY, x, flag)
  np.testing.assert_allclose(qat, qat_apply(unrolled, ".*", QuantSpec(bits=4))(BRANCHY, x),
                             rtol=1e-5, atol=1e-6)  # fmt: skip


def test_calibration_refuses_a_kernel_inside_cond():
  with pytest.raises(ControlFlowError, match=r"inside `cond`.*`a`"):
    collect(lambda p, x: _branchy(p, x, 1), BRANCHY, [jnp.ones((4, 8))], "a",
            {"absmax": absmax_reducer()})  # fmt: skip


def test_stacked_qarray_round_trips():
  w = jax.random.normal(jax.random.key(7), (3, 64, 16))
  layers = [js.quantize(w[i], QuantSpec(bits=4, group_size=32, symmetric=False)) for i in range(3)]
  q = stack(layers)
  assert q.layers == 3 and q.codes.shape == (3, 32, 16) and q.zero_point.shape == (3, 2, 16)
  np.testing.assert_array_equal(materialize(q)[1], materialize(layers[1]))
  np.testing.assert_array_equal(q[2].codes, layers[2].codes)
  assert "x3 layers" in q.describe()
  with pytest.raises(TypeError, match="stacked"):
    layers[0][0]
  with pytest.raises(ValueError, match="differs from layer 0"):
    stack([layers[0], js.quantize(w[1], QuantSpec(bits=8))])


def _reverse_scan(params, x):
  """A reversed scan over a stacked kernel with a kernel shared by every step (a const)."""

  def step(x, w):
    return jnp.tanh(x @ w) @ params["shared"], None

  return lax.scan(step, x, params["stack"], reverse=True)[0]


REVERSED = {
  "stack": jax.random.normal(jax.random.key(8), (3, 8, 8)) / 3,
  "shared": jax.random.normal(jax.random.key(9), (8, 8)) / 3,
}


def test_reverse_scan_and_shared_kernels_are_followed():
  x = jax.random.normal(jax.random.key(10), (4, 8))
  got = collect(_reverse_scan, REVERSED, [x], ".*", {"absmax": absmax_reducer()})
  assert got.sites["stack"].layers == 3 and got.sites["shared"].layers is None
  # Layer 2 runs first: its input is `x` itself.
  np.testing.assert_allclose(got.stats["stack"]["absmax"][2], jnp.max(jnp.abs(x), 0), rtol=1e-6)
  inputs, h = [], x
  for i in (2, 1, 0):
    h = jnp.tanh(h @ REVERSED["stack"][i])
    inputs.append(h)
    h = h @ REVERSED["shared"]
  # The shared kernel's statistics cover every step.
  want = jnp.max(jnp.abs(jnp.concatenate(inputs)), 0)
  np.testing.assert_allclose(got.stats["shared"]["absmax"], want, rtol=1e-5)
  tree = js.quantize_params(
    REVERSED,
    ".*",
    LayerQuant(QuantSpec(bits=8), 8),
    contract_dims=find_sites(_reverse_scan, REVERSED, x),
  )
  assert tree["stack"].layers == 3 and tree["shared"].layers is None
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = jax.jit(quantized_apply(_reverse_scan, strict=True))(tree, x)
  np.testing.assert_allclose(out, _reverse_scan(materialize(tree), x), rtol=0.05, atol=0.05)


def test_lowrank_apply_runs_a_scanned_model(model):
  kind, scanned, _, params, batches = model
  from jaxshrink.lowrank import factorize, lowrank_apply

  ctree = factorize(params, ".*fc1/kernel", rank=4)
  got = jax.jit(lowrank_apply(scanned))(ctree, batches[0])
  want = scanned(materialize(ctree), batches[0])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_stacked_qarray_used_whole_is_named():
  def whole(params, x):  # every layer at once, outside any scan
    return jnp.einsum("bi,lio->lbo", x, params["stack"])

  x = jax.random.normal(jax.random.key(11), (4, 8))
  sites = find_sites(_reverse_scan, REVERSED, x)
  tree = js.quantize_params(REVERSED, ".*", LayerQuant(QuantSpec(bits=8), 8), contract_dims=sites)
  with pytest.raises(IntegerPathError, match=r"`stack`.*stack of 3 layers used whole"):
    quantized_apply(whole, strict=True)(tree, x)
