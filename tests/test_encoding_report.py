"""The compressed-leaf protocol, `materialize`, and report arithmetic."""

import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxshrink import Cast, Encoding, cast_params, materialize, register_encoding, tree_report
from jaxshrink.encoding import encoding_class, registered_encodings
from jaxshrink.report import format_bytes


@pytest.fixture(scope="module")
def params():
  key1, key2 = jax.random.split(jax.random.key(0))
  return {
    "Dense_0": {"kernel": jax.random.normal(key1, (64, 32)), "bias": jnp.zeros(32)},
    "Dense_1": {"kernel": jax.random.normal(key2, (32, 10)), "bias": jnp.ones(10)},
  }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cast_bytes_bits_and_values(params, dtype):
  enc = Cast.encode(params["Dense_0"]["kernel"], dtype)
  assert enc.shape == (64, 32) and enc.dtype == "float32"
  assert enc.nbytes == 64 * 32 * 2
  assert enc.bits_per_weight == 16.0
  dense = enc.materialize()
  assert dense.dtype == jnp.float32
  expected = np.asarray(params["Dense_0"]["kernel"]).astype(dtype).astype(np.float32)
  np.testing.assert_array_equal(dense, expected)


def test_cast_bad_input():
  with pytest.raises(ValueError, match=r"cast `dtype` must be one of.*got 'int8' for `a/b`"):
    Cast.encode(jnp.ones(3), "int8", path="a/b")
  with pytest.raises(TypeError, match="needs a float array at `step`"):
    Cast.encode(jnp.ones(3, jnp.int32), "bfloat16", path="step")


def test_materialize_inside_jit_and_grad(params):
  ctree = cast_params(params, ".*kernel")

  @jax.jit
  def forward(tree, x):
    p = materialize(tree)
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    return (h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]).sum()

  x = jnp.ones((2, 64))
  ref = forward(materialize(ctree), x)
  np.testing.assert_allclose(forward(ctree, x), ref, rtol=1e-6)
  grads = jax.grad(forward)(ctree, x)
  assert isinstance(grads["Dense_0"]["kernel"], Cast)


def test_cast_params_skips_already_encoded_leaves(params):
  once = cast_params(params, ".*kernel", dtype="float16")
  twice = cast_params(once, dtype="bfloat16")  # the default selects leaves of every rank
  assert twice["Dense_0"]["kernel"] is once["Dense_0"]["kernel"]
  assert isinstance(twice["Dense_0"]["bias"], Cast)


def test_encodings_live_in_nnx_state():
  _, state = nnx.split(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), nnx.Param)
  ctree = cast_params(state, ".*kernel")
  report = tree_report(ctree)
  assert [leaf.encoding for leaf in report.layers] == ["float32", "cast"]
  dense = materialize(ctree)
  np.testing.assert_allclose(dense["kernel"][...], state["kernel"][...], atol=1e-2)


def test_report_arithmetic(params):
  ctree = cast_params(params, "Dense_0/kernel")
  report = tree_report(ctree)
  by_path = {leaf.path: leaf for leaf in report.layers}
  assert by_path["Dense_0/kernel"].bytes == 64 * 32 * 2
  assert by_path["Dense_0/kernel"].bits_per_weight == 16.0
  assert by_path["Dense_0/bias"].sparsity == 1.0
  assert by_path["Dense_1/bias"].sparsity == 0.0
  n = 64 * 32 + 32 + 32 * 10 + 10
  assert report.num_params == n
  assert report.float32_bytes == 4 * n
  assert report.total_bytes == 4 * n - 2 * 64 * 32
  assert report.ratio == pytest.approx(4 * n / (4 * n - 2 * 64 * 32))
  payload = report.to_json()
  assert set(payload) == {
    "layers",
    "total_bytes",
    "float32_bytes",
    "ratio",
    "native_bytes",
    "native_ratio",
  }
  assert payload["native_ratio"] == payload["ratio"]  # a float32 model: the same yardstick
  assert set(payload["layers"][0]) >= {
    "path",
    "shape",
    "encoding",
    "bits_per_weight",
    "sparsity",
    "bytes",
  }


def test_report_json_round_trip(params):
  report = tree_report(cast_params(params))
  again = type(report).from_json(report.to_json())
  assert again.total_bytes == report.total_bytes and again.ratio == report.ratio


def test_format_bytes():
  assert format_bytes(512) == "512 B"
  assert format_bytes(2048) == "2.0 KiB"
  assert format_bytes(3 * 1024**2) == "3.0 MiB"


def test_registry():
  assert "cast" in registered_encodings()
  assert encoding_class("cast") is Cast
  with pytest.raises(ValueError, match="Unknown encoding `nope`.*upgrade"):
    encoding_class("nope")


def test_register_rejects_bad_array_fields():
  with pytest.raises(TypeError, match="array_fields names missing fields"):

    @register_encoding
    class Broken(Encoding):
      name: ClassVar[str] = "broken-test"
      array_fields: ClassVar[tuple[str, ...]] = ("codes",)
      shape: tuple
      dtype: str


def test_repr_is_short(params):
  text = repr(Cast.encode(params["Dense_0"]["kernel"], "bfloat16"))
  assert text == "Cast(64x32 float32, bfloat16 storage, 4096 bytes)"


def test_bf16_model_reports_the_saving_against_its_own_dtype(tmp_path, capsys):
  from jaxshrink import save
  from jaxshrink.cli import main
  from jaxshrink.quant import QuantSpec, quantize_params

  params = {
    "dense": {"kernel": jnp.ones((64, 64), jnp.bfloat16), "bias": jnp.ones(64, jnp.bfloat16)}
  }
  tree = quantize_params(params, ".*kernel", QuantSpec(bits=8))
  report = tree_report(tree)
  assert report.native_bytes == 2 * (64 * 64 + 64)
  assert report.native_ratio == pytest.approx(report.ratio / 2)  # int8 of bf16 saves ~2x, not 4x
  assert report.native_ratio < 2.0 < report.ratio
  assert {leaf["dtype"] for leaf in report.to_json()["layers"]} == {"bfloat16"}
  save(tmp_path / "ckpt", tree)
  assert main(["inspect", str(tmp_path / "ckpt")]) == 0
  out = " ".join(capsys.readouterr().out.split())
  assert "vs own dtype" in out and f"{report.native_ratio:.2f}x against" in out
  assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
  payload = json.loads(capsys.readouterr().out)
  assert payload["native_ratio"] == pytest.approx(report.native_ratio, rel=1e-3)
