"""Quantized embedding tables: per-row int8 and row-grouped int4 codes, row-only decode in
`jit`, export round trip, manifest validation, the `embeddings` stage option, a tied head."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxshrink.quant.stage  # noqa: F401  (registers the `quantize` stage)
from jaxshrink import evaluation, export, recipes
from jaxshrink.cli import main
from jaxshrink.encoding import materialize
from jaxshrink.errors import CheckpointError, UsageError
from jaxshrink.export.validate import check_leaf
from jaxshrink.models import bert
from jaxshrink.models.base import nnx_functions
from jaxshrink.quant import QArray, QuantSpec
from jaxshrink.quant.ptq import gather_tables, quantize_params, quantize_tables
from jaxshrink.quant.qarray import quantize
from jaxshrink.quant.serve import gather_rows, quantized_apply
from jaxshrink.quant.stage import quantize_stage
from jaxshrink.tree import flatten

VOCAB, DIM = 500, 32  # distinct sizes, so a full f32[500,32] table is easy to spot in HLO
WORD = "embeddings/word_embeddings/embedding"
TABLES = (
  WORD,
  "embeddings/position_embeddings/embedding",
  "embeddings/token_type_embeddings/embedding",
)
SPECS = {"int8": QuantSpec(bits=8), "int4-g8": QuantSpec(bits=4, group_size=8)}


@pytest.fixture(scope="module")
def tiny_bert():
  config = bert.BertConfig(num_layers=1, hidden_size=DIM, num_heads=2, intermediate_size=64,
                           vocab_size=VOCAB, max_positions=48)  # fmt: skip
  init, apply = nnx_functions(functools.partial(bert.BertEncoder, config))
  params = init(jax.random.key(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (3, 16)), jnp.int32)
  return apply, params, ids


def _table(seed=0, shape=(VOCAB, DIM)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  # Rows of very different ranges: per-row scales matter.
  return (rng.normal(size=shape) * rng.uniform(0.01, 2.0, (shape[0], 1))).astype(np.float32)


def _quantized(table, spec) -> QArray:
  return quantize_tables({"t": table}, ["t"], spec)["t"]


def test_int8_per_row_codes_and_scales_match_numpy():
  table = _table()
  q = _quantized(table, SPECS["int8"])
  # One scale per token row; XLA divides by 127 as a multiply by its reciprocal (1 ulp).
  scale = np.abs(table).max(axis=1) / np.float32(127)
  assert q.table and q.contract_dims == (1,) and (q.k, q.n) == (DIM, VOCAB)
  assert q.codes.dtype == jnp.int8 and q.codes.shape == (DIM, VOCAB)
  np.testing.assert_allclose(np.asarray(q.scale), scale[None, :], rtol=2.4e-7, atol=0)
  codes = np.clip(np.round(table / np.asarray(q.scale).T), -127, 127).astype(np.int8)
  np.testing.assert_array_equal(np.asarray(q.codes), codes.T)
  assert q.describe() == "int8 per-row sym"


def test_int4_row_groups_codes_and_scales_match_numpy():
  table = _table(1)
  q = _quantized(table, SPECS["int4-g8"])
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (DIM // 2, VOCAB)  # nibble-packed
  assert q.scale.dtype == jnp.bfloat16 and q.scale.shape == (DIM // 8, VOCAB)
  exact = np.abs(table.reshape(VOCAB, DIM // 8, 8)).max(axis=2) / np.float32(7)  # (vocab, G)
  stored = np.asarray(q.scale.astype(jnp.float32)).T
  # The stored scale is the smallest bf16 value >= the exact float32 scale (nothing clips).
  below = (np.asarray(q.scale).T.view(np.uint16) - 1).view(ml_dtypes.bfloat16).astype(np.float32)
  assert np.all(stored >= exact) and np.all(below < exact)
  codes = np.clip(np.round(table / np.repeat(stored, 8, axis=1)), -7, 7).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(q.unpacked_codes()), codes.T)
  assert q.describe() == "int4 g8 per-row sym"


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_gathered_rows_equal_the_dequantized_table(spec):
  table = _table(2)
  q = _quantized(table, spec)
  ids = jnp.asarray([[0, 7, 499], [3, 3, 250]], jnp.int32)
  dense = np.asarray(materialize(q))
  rows = jax.jit(gather_rows)(q, ids)
  assert rows.shape == (2, 3, DIM) and rows.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(rows), dense[np.asarray(ids)])
  assert np.abs(dense - table).max() <= np.abs(table).max() / (127 if spec.bits == 8 else 7)


@pytest.mark.parametrize(
  "spec",
  [QuantSpec(bits=8, per_tensor=True), QuantSpec(bits=4, symmetric=False)],
  ids=["per-tensor", "int4-asym"],
)
@pytest.mark.parametrize("vocab", [1, 40])
def test_gathered_rows_of_other_specs(spec, vocab):
  q = dataclasses.replace(quantize(_table(6, (vocab, 16)), spec, contract_dims=(1,)), table=True)
  ids = jnp.asarray([[0, vocab - 1, 0]], jnp.int32)
  expected = np.asarray(materialize(q))[np.asarray(ids)]
  np.testing.assert_array_equal(np.asarray(jax.jit(gather_rows)(q, ids)), expected)


def test_bert_tables_are_found_by_gather_not_by_name(tiny_bert):
  apply, params, ids = tiny_bert
  uses = gather_tables(apply, params, ids)
  assert sorted(uses) == sorted(TABLES)
  assert all(u.rows and not u.matmul for u in uses.values())


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_quantized_apply_equals_apply_with_the_dequantized_tables(tiny_bert, spec):
  apply, params, ids = tiny_bert
  ctree = quantize_tables(params, TABLES, spec)
  ctree = quantize_params(ctree, ".*kernel", QuantSpec(bits=8))
  reference = jax.jit(lambda t, x: apply(materialize(t), x))(ctree, ids)
  served = jax.jit(quantized_apply(apply))(ctree, ids)
  np.testing.assert_allclose(np.asarray(served), np.asarray(reference), rtol=1e-5, atol=1e-6)
  float_out = np.asarray(jax.jit(apply)(params, ids))
  cosine = np.sum(np.asarray(served) * float_out, axis=-1)  # both of unit norm
  assert cosine.min() > (0.999 if spec.bits == 8 else 0.98)


def test_serving_gathers_int8_codes_without_a_full_f32_table(tiny_bert):
  apply, params, ids = tiny_bert
  ctree = quantize_tables(params, TABLES, QuantSpec(bits=8))
  hlo = jax.jit(quantized_apply(apply)).lower(ctree, ids).compile().as_text()
  assert f"s8[{DIM},{VOCAB}]" in hlo and "gather" in hlo  # the lookup reads the int8 codes
  assert f"f32[{VOCAB},{DIM}]" not in hlo and f"f32[{DIM},{VOCAB}]" not in hlo


def test_out_of_range_ids_fill_like_jnp_take():
  table = _table(3, (40, 16))
  q = _quantized(table, SPECS["int8"])
  ids = jnp.asarray([0, 39, 40, -41], jnp.int32)  # jnp.take's default mode fills with NaN
  served = jax.jit(quantized_apply(lambda p, x: jnp.take(p["t"], x, axis=0)))({"t": q}, ids)
  expected = jnp.take(materialize(q), ids, axis=0)
  np.testing.assert_array_equal(np.asarray(served), np.asarray(expected))
  assert np.isnan(np.asarray(served)[2:]).all()


def test_export_round_trip_is_bit_exact_and_inspected(tiny_bert, tmp_path, capsys):
  _, params, _ = tiny_bert
  ctree = quantize_tables(params, TABLES, QuantSpec(bits=4, group_size=8))
  export.save(tmp_path / "ckpt", ctree)
  loaded = flatten(export.load(tmp_path / "ckpt"))
  for path in TABLES:
    before, after = flatten(ctree)[path], loaded[path]
    assert isinstance(after, QArray) and after.table and after.contract_dims == (1,)
    for field in ("codes", "scale"):
      a, b = np.asarray(getattr(before, field)), np.asarray(getattr(after, field))
      assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
  assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
  rows = {leaf["path"]: leaf for leaf in json.loads(capsys.readouterr().out)["layers"]}
  assert rows[WORD]["description"] == "int4 g8 per-row sym"
  assert rows[WORD]["bytes"] == VOCAB * DIM // 2 + 2 * VOCAB * DIM // 8


def _manifest_leaf(tmp_path, spec, path=WORD) -> dict:
  table = {"embeddings": {"word_embeddings": {"embedding": _table(4, (64, 32))}}}
  ctree = quantize_tables(table, [WORD], spec)
  manifest = json.loads((export.save(tmp_path / "m", ctree) / "manifest.json").read_text())
  (leaf,) = [leaf for leaf in manifest["leaves"] if leaf["path"] == path]
  return leaf


@pytest.mark.parametrize(
  ("edit", "match"),
  [
    (lambda s: s.update(table="yes"), r"`static.table` must be true or false"),
    (lambda s: s.update(contract_dims=[0], k=64, n=32), r"`static.contract_dims` must be \[1\]"),
    (lambda s: s.update(group_size=12), r"`static.group_size` must be null .* divisor of dim=32"),
    (lambda s: s.update(per_tensor=True), r"`static.group_size` must be null"),
  ],
)
def test_validation_refuses_bad_table_metadata(tmp_path, edit, match):
  leaf = _manifest_leaf(tmp_path, QuantSpec(bits=4, group_size=8))
  check_leaf(leaf, 0)  # as written: valid
  edit(leaf["static"])
  with pytest.raises(CheckpointError, match=match):
    check_leaf(leaf, 0)


class TiedLM(nn.Module):
  """Embedding, one Dense, and an output head tied to the embedding (`Embed.attend`)."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, DIM, name="embed")
    x = nn.gelu(nn.Dense(DIM, name="mix")(embed(tokens)))
    return embed.attend(x)


def test_tied_head_keeps_one_stored_copy(tmp_path):
  module = TiedLM()
  ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 8)), jnp.int32)
  params = module.init(jax.random.key(0), ids)["params"]
  apply = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
  uses = gather_tables(apply, params, ids)
  assert list(uses) == ["embed/embedding"] and uses["embed/embedding"].matmul
  ctree = quantize_tables(params, uses, QuantSpec(bits=8))
  ctree = quantize_params(ctree, ".*kernel", QuantSpec(bits=8))
  served = jax.jit(quantized_apply(apply))(ctree, ids)
  reference = jax.jit(lambda t, x: apply(materialize(t), x))(ctree, ids)
  np.testing.assert_allclose(np.asarray(served), np.asarray(reference), rtol=1e-5, atol=1e-5)
  manifest = json.loads((export.save(tmp_path / "tied", ctree) / "manifest.json").read_text())
  stored = [leaf["path"] for leaf in manifest["leaves"] if leaf.get("encoding") == "qarray"]
  assert sorted(stored) == ["embed/embedding", "mix/kernel"]  # the head has no copy of its own
  table = flatten(ctree)["embed/embedding"]
  assert table.nbytes == VOCAB * DIM + 4 * VOCAB


@pytest.fixture(scope="module")
def tiny_lm():
  return recipes.prepare(recipes.parse_recipe({"model": "tiny-lm"}), progress=False)


def _options(**given):
  recipe = recipes.parse_recipe({"model": "tiny-lm", "stages": [{"quantize": given}]})
  return recipe.stages[0][1]


def test_stage_option_on_tiny_lm(tiny_lm):
  assert _options()["embeddings"] is None  # off by default: existing recipes are unchanged
  out = quantize_stage(tiny_lm, _options(weight_bits=8, embeddings={"bits": 8}))
  flat = flatten(out.tree)
  tables = {p: leaf for p, leaf in flat.items() if isinstance(leaf, QArray) and leaf.table}
  assert sorted(tables) == ["embed/embedding", "pos_embed/embedding"]
  assert all(t.describe() == "int8 per-row sym" for t in tables.values())
  assert flat["head/kernel"].describe() == "int8 per-channel sym"
  served = evaluation.evaluate_tree(tiny_lm.model, out.tree, tiny_lm.dataset)
  float_ppl = evaluation.evaluate_tree(tiny_lm.model, tiny_lm.tree, tiny_lm.dataset)
  assert served <= float_ppl * 1.02  # perplexity
  grouped = quantize_stage(
    tiny_lm,
    _options(
      embeddings={"bits": 4, "group_size": 32, "overrides": [{"target": "pos.*", "bits": 8}]}
    ),
  )
  flat = flatten(grouped.tree)
  assert flat["embed/embedding"].describe() == "int4 g32 per-row sym"
  assert flat["pos_embed/embedding"].describe() == "int8 g32 per-row sym"


def test_stage_option_with_calibrated_w8a8_on_tiny_lm(tiny_lm):
  options = _options(
    activation_bits=8, static_activations=True, calibration_batches=1, embeddings={"bits": 8}
  )
  flat = flatten(quantize_stage(tiny_lm, options).tree)
  assert flat["embed/embedding"].table and flat["embed/embedding"].act_bits is None
  assert flat["pos_embed/embedding"].describe() == "int8 per-row sym"
  assert flat["head/kernel"].act_bits == 8 and flat["head/kernel"].act_scale.shape == (1,)


@pytest.mark.parametrize(
  ("given", "match"),
  [
    ({"embeddings": {"bits": 8, "axis": 0}}, r"`embeddings` of `quantize` must be null or"),
    ({"embeddings": {"bits": 5}}, r"`embeddings` of `quantize`: Unsupported `bits`=5"),
    ({"embeddings": {"bits": 4, "group_size": 48}}, r"`group_size`=48 does not divide .*dim=160"),
    (
      {"embeddings": {"overrides": [{"target": "head/kernel", "bits": 4}]}},
      r"`embeddings.overrides\[0\].target` 'head/kernel' .* matches no embedding table",
    ),
    (
      {"embeddings": {"overrides": [{"bits": 4}]}},
      r"`embeddings.overrides\[0\]` of `quantize` must be a mapping with a `target`",
    ),
    (
      {"target": ".*(kernel|embedding)", "embeddings": {"bits": 8}},
      r"`embed/embedding` is an embedding table .* also selected by `target`",
    ),
  ],
)
def test_stage_refuses_bad_embedding_settings(tiny_lm, given, match):
  with pytest.raises(UsageError, match=match):
    quantize_stage(tiny_lm, _options(**given))


def test_quantize_tables_refuses_non_tables():
  with pytest.raises(ValueError, match=r"`t` has shape \(4, 2, 2\); per-row quantization"):
    quantize_tables({"t": np.ones((4, 2, 2), np.float32)}, ["t"], QuantSpec(bits=8))
  with pytest.raises(ValueError, match=r"`group_size`=5 does not divide the rows of `t` \(dim=16"):
    quantize_tables({"t": _table(5, (8, 16))}, ["t"], QuantSpec(bits=4, group_size=5))
