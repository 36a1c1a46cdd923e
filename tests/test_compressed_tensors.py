"""compressed-tensors export and import, checked against compressed-tensors and transformers.

A tiny random Llama is quantized with our quantizer in several schemes, written with
`export_compressed_tensors`, and then (1) our NumPy packing is compared with compressed-tensors'
`pack_to_int32`, (2) compressed-tensors' own decompressors must give back our float32
dequantization bit for bit, (3) transformers loads each directory and its logits match our
model's, (4) `read_compressed_state` gives back the very codes, scales and zero points, and
(5) what the format cannot hold is refused with a `UsageError`, damaged input with a
`CheckpointError`.
"""

import contextlib
import dataclasses
import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink.encoding import materialize
from jaxshrink.errors import CheckpointError, UsageError
from jaxshrink.interop.compressed_tensors import compressed_state
from jaxshrink.interop.ct_pack import pack_int32, unpack_int32
from jaxshrink.interop.ct_read import read_compressed_state
from jaxshrink.interop.hf import export_compressed_tensors
from jaxshrink.models.base import zoo_model
from jaxshrink.models.llama import LlamaConfig, LlamaForCausalLM
from jaxshrink.quant import LayerQuant, QArray, QuantSpec, quantize, quantize_params, stack
from jaxshrink.quant.ptq import ptq
from jaxshrink.quant.serve import quantized_apply
from jaxshrink.sparsity import NMSparse
from jaxshrink.tree import flatten, map_with_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

CONFIG = LlamaConfig(
  vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
  num_kv_heads=2, max_positions=64,
)  # fmt: skip
IDS = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
# Weight-only: both sides multiply the same float32 weights (bit-exact, test 2) in float32; only
# the summation order of XLA and torch differs, ~1e-7 relative per op. Measured max |diff| on
# logits of magnitude ~1: 3.6e-7. The bound leaves 25x headroom for other BLAS builds.
WEIGHT_ONLY_ATOL = 1e-5
# W8A8: both sides quantize activations to int8, but by different rules: compressed-tensors'
# dynamic per-token scale is absmax / 127.5 with codes in [-128, 127], ours is absmax / 127 with
# codes in [-127, 127] (as vLLM's dynamic kernel), and a static scale clips an out-of-range
# negative at -128 there, -127 here. So every dynamic code may differ by one step: two
# quantization-noise draws, whose difference is about as large as the noise itself. Measured max
# |diff| on logits of magnitude ~1: 1.5e-2 (float vs ours: 1.9e-2); static-only: 4.5e-3.
W8A8_ATOL = 4e-2


def _model():
  return zoo_model(
    "ct-tiny", functools.partial(LlamaForCausalLM, CONFIG), (16,), "int32", "tiny Llama",
    data="", metric="perplexity", train_steps=1, learning_rate=1e-3, batch_size=1,
  )  # fmt: skip


@pytest.fixture(scope="module")
def base():
  model = _model()
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0)))
  return model, params, jax.jit(model.apply)


def _prune_24(w):
  """2:4 along the input axis: keep the 2 largest |w| of every 4 consecutive rows."""
  k, n = w.shape
  groups = np.abs(w).reshape(k // 4, 4, n)
  keep = np.argsort(-groups, axis=1)[:, :2, :]
  mask = np.zeros_like(groups, bool)
  np.put_along_axis(mask, keep, True, axis=1)
  return (w.reshape(k // 4, 4, n) * mask).reshape(k, n)


def _mixed(path, w):
  """Symmetric weight-only schemes, a per-row int8 table and 2:4 kernels (float and int4)."""
  if path == "model/embed_tokens/embedding":
    return dataclasses.replace(quantize(w, QuantSpec(bits=8), contract_dims=(1,)), table=True)
  if path == "lm_head/kernel":
    return _prune_24(w)  # stays float: written as `weight`, listed in `ignore`
  if not path.endswith("kernel"):
    return w
  if "layers/0/self_attn" in path:
    return quantize(w, QuantSpec(bits=4, group_size=128))
  if "layers/0/mlp" in path:
    return quantize(w, QuantSpec(bits=4, group_size=32))
  if "layers/1/self_attn" in path:
    return quantize(w, QuantSpec(bits=8))  # W8A16 per-channel
  return quantize(_prune_24(w), QuantSpec(bits=4, group_size=128))


@pytest.fixture(scope="module")
def trees(base):
  model, params, _ = base
  mixed = map_with_path(_mixed, params)
  asym = quantize_params(params, r".*layers.*kernel", QuantSpec(bits=4, group_size=128,
                         symmetric=False))  # fmt: skip
  dynamic = quantize_params(params, r".*layers.*kernel", LayerQuant(QuantSpec(bits=8), 8))
  per_tensor = LayerQuant(QuantSpec(bits=8, per_tensor=True), 8)
  static = ptq(model.apply, params, [jnp.asarray(IDS)], r".*layers/1/.*kernel",
               QuantSpec(bits=8), activation_bits=8, static_activations=True,
               overrides=[(r".*o_proj.*", per_tensor)])  # fmt: skip
  flat_static = flatten(static)
  w8a8 = map_with_path(
    lambda p, leaf: flat_static[p] if "layers/1/" in p and p.endswith("kernel") else leaf, dynamic
  )
  return {"mixed": mixed, "asym": asym, "w8a8": w8a8}


@pytest.fixture(scope="module")
def exported(base, trees, tmp_path_factory):
  model = base[0]
  out = {}
  for name, tree in trees.items():
    with (
      pytest.warns(UserWarning, match="written dequantized")
      if name == "mixed"
      else contextlib.nullcontext()
    ):
      path = export_compressed_tensors(tree, model, tmp_path_factory.mktemp(name) / "ct")
    config = json.loads((path / "config.json").read_text())
    out[name] = (path, load_file(str(path / "model.safetensors")), config["quantization_config"])
  return out


def _qarrays(tree):
  """{HF module name: QArray} of the quantized Linear kernels."""
  from jaxshrink.models.llama_hf import to_hf_name

  out = {}
  for path, leaf in flatten(tree).items():
    if isinstance(leaf, QArray) and not leaf.table:
      out[to_hf_name(path)[0].removesuffix(".weight")] = leaf
  return out


def test_export_needs_no_torch(tmp_path):
  # TPU hosts often have no torch: the export path must not import it (nor transformers).
  script = f"""
import functools, sys
sys.modules.update(torch=None, transformers=None, compressed_tensors=None)
import jax
from jaxshrink.interop.hf import export_compressed_tensors
from jaxshrink.models.base import zoo_model
from jaxshrink.models.llama import LlamaConfig, LlamaForCausalLM
from jaxshrink.quant import QuantSpec, quantize_params
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=2, num_kv_heads=1, max_positions=16)
model = zoo_model("t", functools.partial(LlamaForCausalLM, config), (8,), "int32", "t", data="",
                  metric="perplexity", train_steps=1, learning_rate=1e-3, batch_size=1)
tree = quantize_params(model.init(jax.random.key(0)), ".*layers.*kernel", QuantSpec(bits=4))
export_compressed_tensors(tree, model, {str(tmp_path / "out")!r})
"""
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 128), (7, 33), (256, 100)])
def test_packing_matches_pack_to_int32(bits, shape):
  codes = np.random.default_rng(bits).integers(-(1 << bits - 1), 1 << bits - 1, shape)
  codes = codes.astype(np.int8)
  for axis in (0, 1):
    want = ct_helpers.pack_to_int32(torch.from_numpy(codes), bits, packed_dim=axis).numpy()
    got = pack_int32(codes, bits, axis)
    assert got.dtype == want.dtype == np.int32 and np.array_equal(got, want)
    assert np.array_equal(unpack_int32(got, bits, shape[axis], axis), codes)


def test_config_groups(exported):
  _, tensors, config = exported["mixed"]
  assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
  assert config["ignore"] == ["lm_head"]
  described = {json.dumps(g["weights"], sort_keys=True) for g in config["config_groups"].values()}
  assert len(described) == len(config["config_groups"]) == 3  # g128, g32, W8A16 (x2 groups)
  assert tensors["model.embed_tokens.weight"].dtype == np.float32  # the table, dequantized
  _, _, w8a8 = exported["w8a8"]
  kinds = {(g["input_activations"]["strategy"], g["weights"]["strategy"])
           for g in w8a8["config_groups"].values()}  # fmt: skip
  assert kinds == {("token", "channel"), ("tensor", "channel"), ("tensor", "tensor")}
  assert w8a8["format"] == "int-quantized"


@pytest.mark.parametrize("name", ["mixed", "asym", "w8a8"])
def test_compressed_tensors_decompresses_bit_exact(trees, exported, name):
  _, tensors, config = exported[name]
  qs, weights = _qarrays(trees[name]), {}
  for group in config["config_groups"].values():
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    for module in group["targets"]:
      local = {n[len(module) + 1 :]: torch.from_numpy(t.copy()) for n, t in tensors.items()
               if n.startswith(module + ".") and n != f"{module}.bias"}  # fmt: skip
      weight = compressor.decompress(local, scheme)["weight"]
      assert weight.dtype == torch.float32  # the scale's dtype: no rounding to bf16
      weights[module] = weight.numpy()
      assert np.array_equal(weights[module], np.asarray(qs[module].dequantized_matrix()).T)
  assert sorted(weights) == sorted(qs)
  if name == "mixed":  # 2:4 zeros stay exact zeros, through int4 and in float
    for pruned in (weights["model.layers.1.mlp.gate_proj"], tensors["lm_head.weight"]):
      assert np.all((pruned.reshape(pruned.shape[0], -1, 4) == 0).sum(axis=2) >= 2)


def _hf_model(path, **kwargs):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def _logits(model):
  with torch.no_grad():
    return model(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()


# transformers notes that `dequantize=True` overrides a field of the checkpoint's own config.
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_transformers_weight_only_logits(base, trees, exported):
  _, _, apply = base
  for name, kwargs in (("mixed", {}), ("asym", {"dequantize": True})):
    # transformers 5.25 decompresses a mixed-scheme checkpoint (module by module) only on its
    # default path, and an asymmetric one only with `dequantize=True`, which applies the first
    # group's scheme to every module: hence one asymmetric scheme for the whole model here.
    extra = (
      {"quantization_config": transformers.CompressedTensorsConfig(**kwargs)} if kwargs else {}
    )
    got = _logits(_hf_model(exported[name][0], **extra))
    ours = np.asarray(apply(materialize(trees[name]), jnp.asarray(IDS)))
    diff = float(np.abs(got - ours).max())
    assert diff < WEIGHT_ONLY_ATOL, (name, diff)


def test_transformers_w8a8_logits(base, trees, exported):
  model, params, apply = base
  tree = trees["w8a8"]
  hf = _hf_model(exported["w8a8"][0])
  got = _logits(hf)
  ours = np.asarray(jax.jit(quantized_apply(model.apply))(tree, jnp.asarray(IDS)))
  diff = float(np.abs(got - ours).max())
  noise = float(np.abs(np.asarray(apply(params, jnp.asarray(IDS))) - ours).max())
  assert diff < W8A8_ATOL and diff < noise, (diff, noise)
  # The weights and static scales are the same numbers on both sides: with activation
  # quantization switched off, transformers computes our model on the dequantized weights.
  flat = _qarrays(tree)
  for name, module in hf.named_modules():
    if name in flat and flat[name].act_scale is not None:
      assert np.array_equal(module.input_scale.detach().numpy(), np.asarray(flat[name].act_scale))
    module.quantization_enabled = False
  weights_only = np.asarray(apply(materialize(tree), jnp.asarray(IDS)))
  assert float(np.abs(_logits(hf) - weights_only).max()) < WEIGHT_ONLY_ATOL


@pytest.mark.parametrize("name", ["mixed", "asym", "w8a8"])
def test_import_round_trip(trees, exported, name):
  _, tensors, config = exported[name]
  state = read_compressed_state(tensors, config)
  for module, q in _qarrays(trees[name]).items():
    got = state[f"{module}.weight"]
    assert isinstance(got, QArray) and got.shape == q.shape
    assert np.array_equal(np.asarray(got.codes), np.asarray(q.codes))
    assert got.scale.dtype == q.scale.dtype and np.array_equal(got.scale, q.scale)
    assert (got.zero_point is None) == (q.zero_point is None)
    if q.zero_point is not None:
      assert np.array_equal(got.zero_point, q.zero_point)
    assert (got.act_bits, got.group_size, got.symmetric, got.per_tensor) == (
      q.act_bits, q.group_size, q.symmetric, q.per_tensor)  # fmt: skip
    if q.act_scale is not None:
      assert np.array_equal(got.act_scale, q.act_scale)
  if name == "mixed":
    table = trees["mixed"]["model"]["embed_tokens"]["embedding"]
    assert np.array_equal(state["model.embed_tokens.weight"], np.asarray(table.materialize()))


def test_import_reads_class_and_regex_targets(trees, exported):
  # llm-compressor writes `targets: ["Linear"]` with `ignore: ["lm_head"]`, or `re:` patterns.
  _, tensors, config = exported["asym"]
  (key,) = config["config_groups"]
  for targets in (["Linear"], [r"re:.*_proj$"]):
    group = {**config["config_groups"][key], "targets": targets}
    state = read_compressed_state(tensors, {**config, "config_groups": {key: group}})
    for module, q in _qarrays(trees["asym"]).items():
      assert np.array_equal(state[f"{module}.weight"].codes, q.codes)


def test_import_reads_symmetric_codes_at_minus_8(exported):
  # llm-compressor's symmetric int4 codes span [-8, 7]; ours stop at -7. Such a kernel comes
  # back exactly, as asymmetric with zero points of 0.
  _, tensors, config = exported["mixed"]
  module = "model.layers.0.self_attn.q_proj"
  codes = unpack_int32(tensors[f"{module}.weight_packed"], 4, 128)
  codes[0, :5] = -8
  tensors = {**tensors, f"{module}.weight_packed": pack_int32(codes, 4)}
  q = read_compressed_state(tensors, config)[f"{module}.weight"]
  assert not q.symmetric and not np.any(q.zero_point)
  scale = tensors[f"{module}.weight_scale"]
  assert np.array_equal(np.asarray(q.dequantized_matrix()).T, codes * scale)


W = np.random.default_rng(1).normal(size=(256, 64)).astype(np.float32)
Q4 = quantize(W, QuantSpec(bits=4, group_size=128))
Q8 = quantize(W, QuantSpec(bits=8))


@pytest.mark.parametrize(
  "spec",
  [
    QuantSpec(bits=4, group_size=32, symmetric=False),
    QuantSpec(bits=4, group_size=64),
    QuantSpec(bits=4, symmetric=False),  # per-channel
    QuantSpec(bits=8, group_size=128),
    QuantSpec(bits=8, symmetric=False),
  ],
  ids=["W4A16-g32-asym", "W4A16-g64", "W4A16-channel-asym", "W8A16-g128", "W8A16-asym"],
)
def test_single_kernel_schemes(spec):
  q = quantize(W, spec)
  tensors, config = compressed_state({"m.weight": (q, True)})
  (group,) = config["config_groups"].values()
  scheme = QuantizationScheme.model_validate(group)
  local = {n[2:]: torch.from_numpy(t.copy()) for n, t in tensors.items()}
  weight = BaseCompressor.get_value_from_registry(scheme.format).decompress(local, scheme)["weight"]
  assert np.array_equal(weight.numpy(), np.asarray(q.dequantized_matrix()).T)
  back = read_compressed_state(tensors, config)["m.weight"]
  assert np.array_equal(back.codes, q.codes) and np.array_equal(back.scale, q.scale)
  assert back.scale.dtype == q.scale.dtype
  assert (back.zero_point is None) == (q.zero_point is None)
  assert q.zero_point is None or np.array_equal(back.zero_point, q.zero_point)


@pytest.mark.parametrize(
  "leaf",
  [
    quantize(W, QuantSpec(bits=3, group_size=128)),
    quantize(W, QuantSpec(bits=2, group_size=128)),
    quantize(W, QuantSpec(bits=8, format="fp8_e4m3")),
    quantize(W, QuantSpec(bits=4, per_tensor=True)),
    dataclasses.replace(Q8, act_bits=4),
    dataclasses.replace(Q4, act_bits=8),
    dataclasses.replace(Q4, input_scale=jnp.ones(256, jnp.float32)),
    dataclasses.replace(quantize(W, QuantSpec(bits=8, group_size=32)), act_bits=8),
    dataclasses.replace(quantize(W, QuantSpec(bits=8, symmetric=False)), act_bits=8),
    quantize(W, QuantSpec(bits=4, group_size=96)),
    stack([Q4, Q4]),
  ],
  ids=[
    "int3",
    "int2",
    "fp8",
    "per-tensor-int4",
    "A4",
    "W4A8",
    "input_scale",
    "W8A8-g32",
    "W8A8-asym",
    "g96",
    "stacked",
  ],  # fmt: skip
)
def test_unsupported_scheme_is_a_usage_error(leaf):
  with pytest.raises(UsageError, match="model.layers.0.mlp.up_proj") as info:
    compressed_state({"model.layers.0.mlp.up_proj.weight": (leaf, True)})
  assert leaf.describe() in str(info.value)


def test_other_refusals():
  with pytest.raises(UsageError, match="No quantized Linear"):
    compressed_state({"lm_head.weight": (W, True)})
  sparse = NMSparse.encode(_prune_24(W), 2, 4, axis=0, values_encoder=lambda v: quantize(
    v, QuantSpec(bits=4, group_size=64)))  # fmt: skip
  with pytest.raises(UsageError, match="sparse-24-bitmask"):
    compressed_state({"m.weight": (sparse, True)})
  with pytest.raises(UsageError, match="only Linear kernels"):
    compressed_state({"m.bias": (Q4, False)})


def test_fused_projections_with_different_schemes_warn():
  attn = "model.layers.0.self_attn"
  state = {f"{attn}.q_proj.weight": (Q4, True), f"{attn}.k_proj.weight": (Q8, True),
           f"{attn}.v_proj.weight": (Q4, True)}  # fmt: skip
  with pytest.warns(UserWarning, match="q_proj/k_proj/v_proj have different schemes"):
    compressed_state(state)


def _damaged(tensors, config):
  mod = "model.layers.0.self_attn.q_proj"  # int4 g128 symmetric
  key = next(k for k, g in config["config_groups"].items() if mod in g["targets"])
  g0 = config["config_groups"][key]

  def with_config(**changes):
    return tensors, {**config, **changes}

  def with_group(**changes):
    return tensors, {**config, "config_groups": {**config["config_groups"],
                     key: {**g0, **changes}}}  # fmt: skip

  def with_tensor(name, value):
    new = {k: v for k, v in tensors.items() if k != name}
    if value is not None:
      new[name] = value
    return new, config

  packed = tensors[f"{mod}.weight_packed"]
  asym_inputs = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token",
                 "dynamic": True}  # fmt: skip
  return {
    "quant_method": with_config(quant_method="gptq"),
    "format": with_group(format="marlin-24"),
    "float weights": with_group(weights={**g0["weights"], "type": "float"}),
    "groups not a dict": with_config(config_groups=["group_0"]),
    "targets not a list": with_group(targets="Linear"),
    "bad regex": with_group(targets=["re:("]),
    "untargeted module": with_group(targets=[t for t in g0["targets"] if t != mod]),
    "missing target": with_group(targets=[*g0["targets"], "model.layers.9.mlp.up_proj"]),
    "asym activations": with_group(input_activations=asym_inputs),
    "missing scale": with_tensor(f"{mod}.weight_scale", None),
    "missing shape": with_tensor(f"{mod}.weight_shape", None),
    "short packed": with_tensor(f"{mod}.weight_packed", packed[:, :-1]),
    "int64 packed": with_tensor(f"{mod}.weight_packed", packed.astype(np.int64)),
    "wrong shape": with_tensor(f"{mod}.weight_shape", np.array([128, 64], np.int64)),
    "scale shape": with_tensor(f"{mod}.weight_scale", np.ones((128, 2), np.float32)),
    "nan scale": with_tensor(f"{mod}.weight_scale", np.full((128, 1), np.nan, np.float32)),
    "extra tensor": with_tensor(f"{mod}.weight_g_idx", np.zeros(128, np.int32)),
  }


def test_damaged_input_is_a_checkpoint_error(exported):
  _, tensors, config = exported["mixed"]
  for case, (t, c) in _damaged(tensors, config).items():
    with pytest.raises(CheckpointError):
      read_compressed_state(t, c)
      pytest.fail(f"{case}: accepted")


def test_load_hf_gives_back_the_compressed_tree(base, trees, exported):
  # `from_hf` / `load_hf` on our own export: the quantized kernels come back as QArrays with
  # the very codes and scales, so the imported model computes exactly what the export held.
  from jaxshrink.interop.hf import load_hf

  model, _, apply = base
  for name in ("asym", "w8a8"):
    again, tree = load_hf(exported[name][0])
    original = flatten(trees[name])
    for path, leaf in flatten(tree).items():
      if isinstance(original[path], QArray):
        assert isinstance(leaf, QArray), path
        np.testing.assert_array_equal(np.asarray(leaf.codes), np.asarray(original[path].codes))
        np.testing.assert_array_equal(np.asarray(leaf.scale), np.asarray(original[path].scale))
    np.testing.assert_array_equal(
      np.asarray(apply(materialize(tree), IDS)), np.asarray(apply(materialize(trees[name]), IDS))
    )


def test_cli_export_of_a_gptq_checkpoint(tmp_path, capsys):
  # The CLI path end to end: a saved checkpoint of an HF-imported model, exported by command.
  from jaxshrink import export
  from jaxshrink.cli import main
  from jaxshrink.interop.hf import export_hf

  model = _model()
  params = jax.tree.map(np.asarray, model.init(jax.random.key(1)))
  source = export_hf(params, model, tmp_path / "hf")
  tree = quantize_params(params, r".*proj/kernel", QuantSpec(bits=4, group_size=128))
  export.save(tmp_path / "ckpt", tree, model=f"hf:{source}")
  out = tmp_path / "ct"
  assert main(["export", str(tmp_path / "ckpt"), "--to", "compressed-tensors", str(out)]) == 0
  assert "compressed-tensors" in capsys.readouterr().out
  config = json.loads((out / "config.json").read_text())
  assert config["quantization_config"]["format"] == "pack-quantized"
  # int3 has no compressed-tensors scheme: a usage error naming it, and nothing written.
  int3 = quantize_params(params, r".*proj/kernel", QuantSpec(bits=3, group_size=128))
  export.save(tmp_path / "int3", int3, model=f"hf:{source}")
  assert (
    main(["export", str(tmp_path / "int3"), "--to", "compressed-tensors", str(tmp_path / "x")]) == 2
  )
  assert "int3" in capsys.readouterr().err and not (tmp_path / "x").exists()
