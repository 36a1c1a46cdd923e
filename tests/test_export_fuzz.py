"""Damaged or hostile checkpoints fail cleanly: every mutation is a `CheckpointError` or a no-op.

One small real checkpoint holds int8, int4 g32 asymmetric, bitmask + int8, 2:4 (stored as
pattern ranks), low-rank + int8 and a 1 MiB float32 leaf (its own orbax entry). Hypothesis
mutates `manifest.json` (values replaced by other types, huge numbers or names such as
`this:s`; keys deleted or inserted; bytes flipped; whitespace added) and the array files
(bytes flipped, truncated or appended). Each load must raise `CheckpointError` or return
exactly the original tree, within the deadline, without importing any module (a sentinel
module on `sys.path` named by the strings records any import).
"""

import json
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxshrink import CheckpointError, load, save
from jaxshrink.lowrank import LowRank, quantize_factors
from jaxshrink.quant import QuantSpec, quantize
from jaxshrink.sparsity.encodings import BitmaskSparse, NMSparse, _values_encoder

SENTINEL = "jaxshrink_fuzz_sentinel"
NAMES = ["this:s", "os:getcwd", f"{SENTINEL}:factory", "qarray", "nm", "bitmask", "lowrank",
         "cast", "array", "nm-ranks", "int8", "uint8", "float32", "bfloat16", "float8_e4m3fn",
         "object", "<f4", "digits-cnn", "digits", "x.npz", "indices", "values",
         "codes"]  # fmt: skip
NUMBERS = [0, 1, -1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32, 33, 255, 256, 2**20, 2**31, 2**40,
           2**62, 2**64, 10**30, -(2**63)]  # fmt: skip
SCALARS = st.one_of(
  st.none(),
  st.booleans(),
  st.sampled_from(NUMBERS),
  st.integers(-(2**70), 2**70),
  st.floats(allow_nan=False, allow_infinity=False),
  st.sampled_from(NAMES),
  st.text(max_size=6),
)
VALUES = st.recursive(
  SCALARS,
  lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(NAMES), inner,
                                                               max_size=3),
  max_leaves=6,
)  # fmt: skip


def _tree():
  key = jax.random.key(0)
  w = np.asarray(jax.random.normal(key, (64, 32)), np.float32)
  sparse = w * (np.abs(w) > np.quantile(np.abs(w), 0.9))
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  lowrank = LowRank.from_factors(u[:, :4] * s[:4], vt[:4], shape=w.shape)
  return {
    "int8": quantize(w, QuantSpec(bits=8)),
    "int4": quantize(w, QuantSpec(bits=4, group_size=32, symmetric=False)),
    "bitmask": BitmaskSparse.encode(sparse, values_encoder=_values_encoder(8, "w")),
    "nm": NMSparse.encode(w, 2, 4, axis=0),
    "lowrank": quantize_factors({"w": lowrank})["w"],
    "big": np.arange(512 * 512, dtype=np.float32).reshape(512, 512),
    "bias": np.arange(32, dtype=np.float32),
  }


def _paths(value, prefix=()):
  """Every (path to a container, key) in a JSON value."""
  out = []
  items = value.items() if isinstance(value, dict) else enumerate(value)
  for key, child in items:
    out.append((*prefix, key))
    if isinstance(child, (dict, list)):
      out.extend(_paths(child, (*prefix, key)))
  return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("fuzz")
  (root / "pkg").mkdir()
  (root / "pkg" / f"{SENTINEL}.py").write_text(
    "import os\nopen(os.environ['FUZZ_SENTINEL_RECORD'], 'a').write('imported')\n"
    "def factory():\n  return None\n"
  )
  ckpt = save(root / "ck", _tree(), model="digits-cnn", data="digits")
  manifest = json.loads((ckpt / "manifest.json").read_text())
  files = sorted(str(p.relative_to(ckpt)) for p in (ckpt / "arrays").rglob("*") if p.is_file())
  reference = load(ckpt)
  return root, ckpt, manifest, _paths(manifest), files, reference


def _same(a, b) -> bool:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  if ta != tb:  # the tree structure includes every encoding's static fields
    return False
  return all(
    np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(la, lb, strict=True)
  )


def _mutate_json(manifest, path, op, value, name):
  manifest = json.loads(json.dumps(manifest))
  parent = manifest
  for key in path[:-1]:
    parent = parent[key]
  key = path[-1]
  if op == "replace":
    parent[key] = value
  elif op == "delete":
    del parent[key]
  elif isinstance(parent, list):
    parent.insert(key, value)
  else:
    parent[name] = value
  return json.dumps(manifest, separators=(",", ":"))


def _check(world, directory: Path, monkeypatch) -> None:
  root, _, _, _, _, reference = world
  before = set(sys.modules)
  start = time.perf_counter()
  try:
    tree = load(directory)
  except CheckpointError as e:
    assert len(str(e).splitlines()) == 1
  else:
    assert _same(tree, reference), "a mutated checkpoint loaded other data"
  assert time.perf_counter() - start < 5
  assert set(sys.modules) - before == set()
  assert not (root / "record.txt").exists()


@pytest.fixture
def sentinel(world, monkeypatch):
  root = world[0]
  monkeypatch.syspath_prepend(str(root / "pkg"))
  monkeypatch.setenv("FUZZ_SENTINEL_RECORD", str(root / "record.txt"))
  load(world[1])  # warm up lazy imports


SETTINGS = settings(
  max_examples=120,
  deadline=timedelta(seconds=5),
  derandomize=True,
  database=None,
  suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(data=st.data())
def test_manifest_mutations_fail_cleanly(world, sentinel, monkeypatch, data):
  _, ckpt, manifest, paths, _, _ = world
  kind = data.draw(st.sampled_from(["edit", "edit", "edit", "bytes", "whitespace"]))
  text = (ckpt / "manifest.json").read_text()
  if kind == "edit":
    path = data.draw(st.sampled_from(paths))
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "insert"]))
    name = data.draw(st.sampled_from(NAMES + ["model", "sha256", "static", "children"]))
    text = _mutate_json(manifest, path, op, data.draw(VALUES), name)
  elif kind == "bytes":
    raw = bytearray(text.encode())
    for _ in range(data.draw(st.integers(1, 3))):
      raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    text = raw.decode("utf-8", errors="surrogateescape")
  else:  # whitespace between tokens: semantically a no-op, so it must load identically
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=5))))
    spots = [i for i in cuts if i > 0 and text[i - 1] in ",:{["]
    for i in reversed(spots):
      text = text[:i] + " \n\t"[i % 3] + text[i:]
  directory = Path(tempfile.mkdtemp(dir=world[0])) / "ck"
  try:
    shutil.copytree(ckpt, directory)
    (directory / "manifest.json").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    _check(world, directory, monkeypatch)
  finally:
    shutil.rmtree(directory.parent)


@SETTINGS
@given(data=st.data())
def test_array_file_mutations_fail_cleanly(world, sentinel, monkeypatch, data):
  _, ckpt, _, _, files, _ = world
  name = data.draw(st.sampled_from(files))
  directory = Path(tempfile.mkdtemp(dir=world[0])) / "ck"
  try:
    shutil.copytree(ckpt, directory)
    victim = directory / name
    raw = bytearray(victim.read_bytes())
    op = data.draw(st.sampled_from(["flip", "flip", "truncate", "append"]))
    if op == "flip" and raw:
      i = data.draw(st.integers(0, len(raw) - 1))
      raw[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
      raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
    else:
      raw += bytes(data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=64)))
    victim.write_bytes(bytes(raw))
    _check(world, directory, monkeypatch)
  finally:
    shutil.rmtree(directory.parent)


def test_json_bombs_are_refused_quickly(world, tmp_path):
  _, ckpt, manifest, _, _, _ = world
  compact = json.dumps(manifest, separators=(",", ":"))
  cases = {
    "deep": "[" * 100_000 + "]" * 100_000,
    "huge int": compact.replace('"pack_below":1048576', '"pack_below":' + "9" * 5000),
    "duplicate keys": compact[:-1] + ',"format":"x"}',
    "nan": compact.replace('"metrics":{}', '"metrics":{"v":NaN}'),
    "overflow": compact.replace('"metrics":{}', '"metrics":{"v":1e999}'),
  }
  assert len({compact, *cases.values()}) == len(cases) + 1  # every case changed the text
  for name, text in cases.items():
    directory = tmp_path / name.replace(" ", "-")
    shutil.copytree(ckpt, directory)
    (directory / "manifest.json").write_text(text)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"corrupt or truncated"):
      load(directory)
    assert time.perf_counter() - start < 2, name
  big = tmp_path / "big"
  shutil.copytree(ckpt, big)
  with open(big / "manifest.json", "ab") as f:
    f.truncate((64 << 20) + 1)  # sparse: no 64 MiB written
  with pytest.raises(CheckpointError, match=r"larger than 67108864 bytes"):
    load(big)


def test_decode_bounds_name_the_leaf_and_field(world, tmp_path):
  """Bounds that encoding enforces, enforced on decode before any array is read."""
  _, ckpt, manifest, _, _, _ = world
  leaves = {leaf["path"]: i for i, leaf in enumerate(manifest["leaves"])}

  def edit(path, fn):
    changed = json.loads(json.dumps(manifest))
    fn(changed["leaves"][leaves[path]])
    return changed

  def nest(meta, levels):  # `meta` with its codes nested `levels` deep
    meta = json.loads(json.dumps(meta))
    if levels:
      meta["children"] = {"codes": nest(meta, levels - 1)}
    return meta

  cases = [
    (edit("nm", lambda x: x["static"].update(m=40)), r"leaf `nm`.*`static.m`"),
    (edit("nm", lambda x: x["static"].update(m=1 << 30)), r"leaf `nm`.*`static.m`.*\[2, 256\]"),
    (edit("int4", lambda x: x["static"].update(bits=5)), r"leaf `int4`.*`static.bits`"),
    (edit("int4", lambda x: x["static"].update(group_size=16)), r"leaf `int4`.*`arrays.scale`"),
    (edit("int4", lambda x: x["static"].update(group_size=0)), r"leaf `int4`.*`static.group_size`"),
    (edit("int8", lambda x: x.update(shape=[64, -32])), r"leaf `int8`.*`shape`"),
    (edit("int8", lambda x: x.update(shape=[2**40, 2**40])), r"leaf `int8`.*`shape`"),
    (edit("int8", lambda x: x.update(shape=[32, 64])), r"leaf `int8`.*`static.k/n`"),
    (edit("int8", lambda x: x.update(dtype="object")), r"leaf `int8`.*`dtype`"),
    (edit("big", lambda x: x.update(dtype="complex64")), r"leaf `big`.*`dtype`"),
    (edit("int8", lambda x: x.update(encoding="pickle")), r"leaf `int8`.*`encoding`"),
    (edit("nm", lambda x: x.update(stored_as={"indices": "zip"})), r"leaf `nm`.*`stored_as`"),
    (edit("bitmask", lambda x: x["static"].update(nnz=10**6)), r"leaf `bitmask`.*`static.nnz`"),
    (edit("lowrank", lambda x: x["children"].update(a=nest(x["children"]["a"], 6))),
     r"leaf `lowrank`.*children.*nested at most 3 deep"),
    (edit("int8", lambda x: x["arrays"].update(codes=["int8", [64, 33]])),
     r"leaf `int8`.*`arrays.codes`"),
    (edit("int8", lambda x: x.update(sparsity="high")), r"leaf `int8`.*`sparsity`"),
  ]  # fmt: skip
  for i, (changed, match) in enumerate(cases):
    directory = tmp_path / str(i)
    shutil.copytree(ckpt, directory)
    (directory / "manifest.json").write_text(json.dumps(changed))
    with pytest.raises(CheckpointError, match=match):
      load(directory)


def test_fixture_holds_every_encoding(world):
  manifest = world[2]
  encodings = {leaf["path"]: leaf.get("encoding", "array") for leaf in manifest["leaves"]}
  assert encodings == {"int8": "qarray", "int4": "qarray", "bitmask": "bitmask", "nm": "nm",
                       "lowrank": "lowrank", "big": "array", "bias": "array"}  # fmt: skip
  nm = next(leaf for leaf in manifest["leaves"] if leaf["path"] == "nm")
  assert nm["stored_as"] == {"indices": "nm-ranks"}
  assert any(name.startswith("arrays/a0") for name in world[4])  # `big` is its own entry
  assert os.path.getsize(world[1] / "manifest.json") < 8192
