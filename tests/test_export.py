"""Compact checkpoint save/load: round trips, manifest, integrity errors."""

import json
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshrink import (
  Cast,
  CheckpointError,
  Encoding,
  QuantSpec,
  cast_params,
  load,
  materialize,
  quantize_params,
  read_manifest,
  register_encoding,
  save,
)
from jaxshrink.export import FORMAT_VERSION, MANIFEST, disk_bytes


@register_encoding
class ScaledTestEncoding(Encoding):
  """A nested encoding (an encoding inside an encoding) used to test export."""

  name: ClassVar[str] = "scaled-test"
  array_fields: ClassVar[tuple[str, ...]] = ("inner", "scale", "offset")
  inner: Encoding
  scale: jax.Array
  offset: jax.Array | None
  shape: tuple[int, ...]
  dtype: str
  note: tuple[str, ...] = ("a", "b")

  def materialize(self):
    return self.inner.materialize() * self.scale


@pytest.fixture(scope="module")
def tree():
  k1, k2 = jax.random.split(jax.random.key(1))
  kernel = jax.random.normal(k1, (16, 8))
  return {
    "encoder": {"layer_0": {"kernel": kernel, "bias": jnp.arange(8.0)}},
    "blocks": {0: {"kernel": jax.random.normal(k2, (8, 4))}},
    "head": {
      "kernel": ScaledTestEncoding(
        inner=Cast.encode(kernel, "float16"),
        scale=jnp.float32(0.5),
        offset=None,
        shape=(16, 8),
        dtype="float32",
      )
    },
  }


def _equal_trees(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_exact(tmp_path, tree):
  ctree = cast_params(tree, "encoder/.*/kernel", dtype="bfloat16")
  save(tmp_path / "ck", ctree, model="m", data="d", recipe={"model": "m"}, metrics={"x": 1})
  loaded = load(tmp_path / "ck")
  _equal_trees(loaded, ctree)
  assert isinstance(loaded["head"]["kernel"], ScaledTestEncoding)
  assert loaded["head"]["kernel"].note == ("a", "b")
  assert loaded["head"]["kernel"].offset is None
  assert 0 in loaded["blocks"]  # int keys survive (nnx lists use them)


def test_dense_load_materializes(tmp_path, tree):
  ctree = cast_params(tree, "encoder/.*/kernel")
  save(tmp_path / "ck", ctree)
  dense = load(tmp_path / "ck", dense=True)
  _equal_trees(dense, jax.tree.map(np.asarray, materialize(ctree)))


def test_manifest_contents(tmp_path, tree):
  save(
    tmp_path / "ck",
    cast_params(tree, "encoder/.*"),
    model="digits-cnn",
    recipe={"a": 1},
    metrics={"value": 0.9},
  )
  manifest = read_manifest(tmp_path / "ck")
  assert manifest["format_version"] == FORMAT_VERSION
  assert manifest["model"] == "digits-cnn" and manifest["recipe"] == {"a": 1}
  assert manifest["metrics"] == {"value": 0.9}
  leaf = {x["path"]: x for x in manifest["leaves"]}["encoder/layer_0/kernel"]
  assert leaf["encoding"] == "cast" and leaf["shape"] == [16, 8] and leaf["dtype"] == "float32"
  assert leaf["bytes"] == 16 * 8 * 2
  assert len(leaf["sha256"]) == 16 and leaf["arrays"] == {"values": ["bfloat16", [16, 8]]}
  assert manifest["totals"]["float32_bytes"] == 4 * (16 * 8 + 8 + 8 * 4 + 16 * 8)


def test_compressed_checkpoint_is_smaller_on_disk(tmp_path):
  params = {"kernel": jax.random.normal(jax.random.key(0), (256, 256))}
  save(tmp_path / "f32", params)
  save(tmp_path / "bf16", cast_params(params))
  assert disk_bytes(tmp_path / "f32") / disk_bytes(tmp_path / "bf16") > 1.9


def test_refuses_to_overwrite_without_flag(tmp_path, tree):
  save(tmp_path / "ck", tree)
  with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
    save(tmp_path / "ck", tree)
  save(tmp_path / "ck", cast_params(tree, "encoder/.*"), overwrite=True)
  assert read_manifest(tmp_path / "ck")["leaves"][0]["encoding"] in ("float32", "cast")
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_failed_save_leaves_nothing(tmp_path):
  with pytest.raises(TypeError, match="Leaf `bad` is a object"):
    save(tmp_path / "ck", {"bad": object()})
  assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="is not a directory"):
    read_manifest(tmp_path / "missing")
  with pytest.raises(CheckpointError, match="has no manifest.json"):
    load(tmp_path)


def test_newer_format_version_is_refused(tmp_path, tree):
  save(tmp_path / "ck", tree)
  manifest_path = tmp_path / "ck" / MANIFEST
  manifest = json.loads(manifest_path.read_text())
  manifest["format_version"] = FORMAT_VERSION + 1
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(
    CheckpointError, match=f"format version {FORMAT_VERSION + 1}.*Upgrade jaxshrink"
  ):
    load(tmp_path / "ck")


def test_truncated_manifest(tmp_path, tree):
  save(tmp_path / "ck", tree)
  manifest_path = tmp_path / "ck" / MANIFEST
  manifest_path.write_text(manifest_path.read_text()[:100])
  with pytest.raises(CheckpointError, match="corrupt or truncated"):
    load(tmp_path / "ck")


def _largest_data_file(directory: Path) -> Path:
  files = [p for p in (directory / "arrays").rglob("*") if p.is_file() and "." not in p.name[:1]]
  files = [p for p in files if p.name != "_METADATA"]
  return max(files, key=lambda p: p.stat().st_size)


def test_flipped_byte_is_detected(tmp_path):
  params = {"encoder": {"kernel": jax.random.normal(jax.random.key(0), (64, 64))}}
  save(tmp_path / "ck", params)
  victim = _largest_data_file(tmp_path / "ck")
  raw = bytearray(victim.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  victim.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match=r"encoder/kernel|truncated or damaged"):
    load(tmp_path / "ck")


def test_missing_array_files(tmp_path, tree):
  save(tmp_path / "ck", tree)
  import shutil

  shutil.rmtree(tmp_path / "ck" / "arrays")
  with pytest.raises(CheckpointError, match="truncated or damaged"):
    load(tmp_path / "ck")


def test_checksum_mismatch_names_the_leaf(tmp_path, tree):
  save(tmp_path / "ck", tree)
  manifest_path = tmp_path / "ck" / MANIFEST
  manifest = json.loads(manifest_path.read_text())
  leaf = next(x for x in manifest["leaves"] if x["path"] == "encoder/layer_0/bias")
  leaf["sha256"] = "0" * 16
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(CheckpointError, match=r"Checksum mismatch in leaf `encoder/layer_0/bias`"):
    load(tmp_path / "ck")


def test_decode_metadata_is_covered_by_the_checksum(tmp_path):
  from jaxshrink.quant import QuantSpec, quantize

  kernel = np.asarray(jax.random.normal(jax.random.key(0), (64, 16)))
  save(tmp_path / "ck", {"w": quantize(kernel, QuantSpec(bits=4, group_size=32)), "b": kernel[0]})
  manifest_path = tmp_path / "ck" / MANIFEST
  original = json.loads(manifest_path.read_text())

  # Each edit keeps the manifest valid for the validator, so only the digest sees it.
  def w(m):
    return next(leaf for leaf in m["leaves"] if leaf["path"] == "w")

  edits = {
    "note": lambda m: w(m)["static"].update(note="edited"),
    "dtype": lambda m: w(m).update(dtype="bfloat16"),
    "keys": lambda m: w(m).update(keys=["v"]),
    "order": lambda m: m["leaves"].reverse(),
  }
  for edit in edits.values():
    manifest = json.loads(json.dumps(original))
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"Checksum mismatch in leaf `.*description"):
      load(tmp_path / "ck")
  manifest = json.loads(json.dumps(original))
  manifest["pack_below"] = 1
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(CheckpointError, match=r"Checksum mismatch in leaf|truncated or damaged"):
    load(tmp_path / "ck")


def test_inspect_reads_only_the_manifest(tmp_path, tree, capsys):
  import shutil

  from jaxshrink.cli import main

  save(tmp_path / "ck", cast_params(tree, "encoder/.*/kernel", dtype="bfloat16"))
  shutil.rmtree(tmp_path / "ck" / "arrays")  # no array file left to open
  assert main(["inspect", str(tmp_path / "ck"), "--json"]) == 0
  payload = json.loads(capsys.readouterr().out)
  layers = {layer["path"]: layer for layer in payload["layers"]}
  assert layers["encoder/layer_0/kernel"]["description"] == "bfloat16 storage"
  assert layers["encoder/layer_0/kernel"]["bytes"] == 16 * 8 * 2
  assert layers["head/kernel"]["bits_per_weight"] == (16 * 8 * 2 + 4) * 8 / (16 * 8)
  assert main(["inspect", str(tmp_path / "ck")]) == 0
  assert "bfloat16 storage" in capsys.readouterr().out


def test_load_selected_leaves_reads_only_their_arrays(tmp_path):
  import shutil

  big = (1 << 20) // 4  # float32 elements of one own orbax entry
  params = {
    "a": {"kernel": np.arange(big, dtype=np.float32).reshape(512, 512)},
    "b": {"kernel": -np.arange(big, dtype=np.float32).reshape(512, 512), "bias": np.ones(3)},
  }
  save(tmp_path / "ck", params)
  shutil.rmtree(tmp_path / "ck" / "arrays" / "a1")  # `b/kernel`'s own entry
  part = load(tmp_path / "ck", leaves=["a/kernel", "b/bias"])
  assert sorted(part) == ["a", "b"] and sorted(part["b"]) == ["bias"]
  np.testing.assert_array_equal(part["a"]["kernel"], params["a"]["kernel"])
  np.testing.assert_array_equal(part["b"]["bias"], params["b"]["bias"])
  with pytest.raises(CheckpointError, match="truncated or damaged"):
    load(tmp_path / "ck")
  with pytest.raises(CheckpointError, match=r"has no leaf 'c/kernel'; its leaves are a/kernel"):
    load(tmp_path / "ck", leaves=["c/kernel"])


@pytest.mark.parametrize(
  "spec", [QuantSpec(bits=8), QuantSpec(bits=4, group_size=16, symmetric=False)]
)
def test_stacked_qarray_round_trip_and_layer_count_is_checked(tmp_path, spec):
  from jaxshrink.quant.qarray import stack

  w = jax.random.normal(jax.random.key(0), (3, 64, 32))
  layers = [quantize_params({"k": w[i]}, "k", spec)["k"] for i in range(3)]
  tree = {"blocks": {"kernel": stack(layers)}}
  save(tmp_path / "c", tree)
  back = load(tmp_path / "c")["blocks"]["kernel"]
  assert back.layers == 3 and back.shape == (3, 64, 32)
  np.testing.assert_array_equal(back.materialize(), tree["blocks"]["kernel"].materialize())
  manifest_path = tmp_path / "c" / MANIFEST
  manifest = json.loads(manifest_path.read_text())
  leaf = next(entry for entry in manifest["leaves"] if entry["path"] == "blocks/kernel")
  leaf["static"]["layers"] = 2  # one layer short of the stored arrays
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(CheckpointError, match=r"static\.layers"):
    load(tmp_path / "c")
