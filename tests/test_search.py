"""The `search` stage and `jaxshrink autocompress`: candidates, the frontier, verification on
held-out training rows, the plain recipe that rebuilds the tree bit for bit, and bad input."""

import dataclasses
import itertools
import json

import jax
import numpy as np
import pytest
import yaml

from jaxshrink import export
from jaxshrink.cli import main
from jaxshrink.errors import UsageError
from jaxshrink.models.minilm import MINILM_PACKAGE
from jaxshrink.recipes import parse_recipe, run_recipe
from jaxshrink.search import assignment_stages, frontier, parse_candidate
from jaxshrink.search.candidates import parse_methods
from jaxshrink.search.solve import fill, thin
from jaxshrink.tree import flatten

# Small and fast: RTN only, one sensitivity batch, few verifications.
SEARCH = {
  "candidates": ["float", "int8", "int4-g32"],
  "methods": {"int": "rtn"},
  "max_drop": 0.02,
  "calibration_batches": 4,
  "sensitivity_batches": 1,
  "max_verifications": 4,
}


def _raw(stages: list) -> dict:
  return {"model": "tiny-lm", "stages": stages, "export": {"serving": None}}


def _recipe(tmp_path, name: str, stages: list) -> str:
  path = tmp_path / f"{name}.yaml"
  path.write_text(
    yaml.safe_dump({"model": "tiny-lm", "stages": stages, "export": {"serving": None}})
  )
  return str(path)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("search")
  recipe = _recipe(tmp, "search", [{"search": SEARCH}])
  out = tmp / "ckpt"
  assert main(["autocompress", recipe, "--out", str(out), "--json"]) == 0
  return tmp, out


def test_parse_candidate_grammar():
  assert parse_candidate("int4-g128").bits == 4 and parse_candidate("int4-g128").group_size == 128
  assert parse_candidate("int8").family == "int8"
  assert parse_candidate("bf16").cast == "bfloat16"
  assert parse_candidate("2:4+int4").nm and parse_candidate("2:4+int4").bits == 4
  assert parse_candidate("lowrank-0.5").budget == 0.5
  for bad in ("int9", "int8-g32", "lowrank-1.5", "3:4", "fp8"):
    with pytest.raises(UsageError, match="(?i)candidate"):
      parse_candidate(bad)


def test_parse_methods_defaults_and_errors():
  cands = [parse_candidate(n) for n in ("int8", "int4-g32", "2:4")]
  assert parse_methods({}, cands) == {"int8": "rtn", "int4": "gptq", "2:4": "sparsegpt"}
  assert parse_methods({"int": "awq"}, cands)["int8"] == "awq"
  with pytest.raises(UsageError, match="methods.int4"):
    parse_methods({"int4": "sparsegpt"}, cands)
  with pytest.raises(UsageError, match="names no candidate family"):
    parse_methods({"lowrank": "svd"}, cands)


def test_frontier_points_are_pareto_optimal():
  rng = np.random.default_rng(0)
  names = ["a", "b", "c"]
  errors = {f"k{i}": {n: float(rng.uniform(0, 1)) for n in names} for i in range(4)}
  costs = {f"k{i}": {n: float(rng.uniform(1, 10)) for n in names} for i in range(4)}
  points = frontier(errors, costs)
  assert all(a.cost >= b.cost for a, b in itertools.pairwise(points))
  every = [
    (sum(costs[k][n] for k, n in zip(errors, choice, strict=True)),
     sum(errors[k][n] for k, n in zip(errors, choice, strict=True)))
    for choice in itertools.product(names, repeat=4)
  ]  # fmt: skip
  for p in points:
    assert p.cost == pytest.approx(sum(costs[k][n] for k, n in p.choice.items()))
    assert not any(c < p.cost - 1e-9 and e < p.error - 1e-9 for c, e in every)
  # Filling a budget spends it without passing it, and never adds error.
  cheap = points[-1]
  budget = cheap.cost + 5.0
  filled = fill(cheap, errors, costs, budget)
  assert cheap.cost <= filled.cost <= budget + 1e-9 and filled.error <= cheap.error
  assert filled.cost == pytest.approx(sum(costs[k][n] for k, n in filled.choice.items()))
  kept = thin(points, 3)
  assert len(kept) <= 4 and kept[0] is points[0] and kept[-1] is points[-1]


def test_assignment_stages_one_override_per_kernel():
  cands = {n: parse_candidate(n) for n in ("int4-g32", "int8", "bf16", "2:4+int4", "lowrank-0.5")}
  assignment = {"a/kernel": cands["int4-g32"], "b/kernel": cands["int8"], "c/kernel": cands["bf16"],
                "d/kernel": cands["2:4+int4"], "e/kernel": cands["lowrank-0.5"]}  # fmt: skip
  methods = parse_methods({"int8": "rtn"}, list(cands.values()))
  stages = assignment_stages(assignment, methods, calibration_batches=4)
  kinds = [k for k, _ in stages]
  assert kinds == ["factorize", "prune", "quantize", "quantize", "cast"]
  gptq = next(o for k, o in stages if k == "quantize" and o["method"] == "gptq")
  assert gptq["overrides"] == [
    {"target": "a/kernel", "weight_bits": 4, "group_size": 32, "symmetric": False}
  ]
  prune = stages[1][1]
  assert prune["structure"] == "2:4" and prune["quantize_nonzeros"] == 4
  assert stages[-1][1] == {"target": "(c/kernel)", "dtype": "bfloat16"}
  # Tables: one `embeddings` override each, with the first quantize stage; bf16 ones are cast.
  tables = {"word": cands["int4-g32"], "pos": parse_candidate("float"), "type": cands["bf16"]}
  stages = assignment_stages({"a/kernel": cands["int8"]}, methods, tables=tables)
  assert stages[0][1]["embeddings"]["overrides"] == [
    {"target": "pos", "skip": True},
    {"target": "type", "skip": True},
    {"target": "word", "bits": 4, "group_size": 32},
  ]
  assert stages[-1] == ("cast", {"target": "(type)", "dtype": "bfloat16"})
  with pytest.raises(UsageError, match="quantizes no kernel"):
    assignment_stages({"a/kernel": cands["bf16"]}, methods, tables=tables)


def test_autocompress_verified_within_budget(searched):
  _, out = searched
  manifest = export.read_manifest(out)
  entry = next(s for s in manifest["metrics"]["stages"] if s["stage"] == "search")["search"]
  assert entry["validation"]["drop"] <= SEARCH["max_drop"]
  assert entry["validation"]["rows"] >= 16
  assert 1 <= len(entry["iterations"]) <= SEARCH["max_verifications"]
  kernels = [p for p in flatten(export.load(out)) if p.endswith("kernel")]
  # Every kernel, and the gathered tables (token and position embeddings) beside them.
  assert {layer["path"] for layer in entry["layers"]} == {*kernels, "embed/embedding",
                                                         "pos_embed/embedding"}  # fmt: skip
  assert {layer["candidate"] for layer in entry["layers"]} <= set(SEARCH["candidates"])
  # Smaller than float, and each verification's bytes are the stored tree's.
  assert manifest["metrics"]["size_bytes"] == entry["validation"]["bytes"]
  assert manifest["metrics"]["size_bytes"] < manifest["metrics"]["float32_bytes"]


def test_plain_recipe_rebuilds_the_tree_bit_for_bit(searched, capsys):
  tmp, out = searched
  plain = tmp / "ckpt.yaml"
  raw = yaml.safe_load(plain.read_text())
  assert "search" not in json.dumps(raw["stages"])
  again = tmp / "again"
  assert main(["compress", str(plain), "--out", str(again), "--json"]) == 0
  a, b = export.load(out), export.load(again)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  capsys.readouterr()
  assert main(["inspect", str(out), "--recipe"]) == 0
  assert yaml.safe_load(capsys.readouterr().out)["stages"] == raw["stages"]


def test_inspect_shows_the_per_kernel_table(searched, capsys):
  _, out = searched
  assert main(["inspect", str(out)]) == 0
  text = capsys.readouterr().out
  assert "search: one candidate per kernel" in text
  assert "block_0/mlp/fc1/kernel" in text and "verified on" in text


def test_sensitivities_are_cached_and_reused(searched):
  out = run_recipe(parse_recipe({"model": "tiny-lm", "stages": [{"search": {**SEARCH,
                   "max_drop": 0.05}}], "export": {"serving": None}}))  # fmt: skip
  entry = next(s for s in out.metrics["stages"] if s["stage"] == "search")["search"]
  assert entry["sensitivity"]["cached"]
  assert entry["validation"]["drop"] <= 0.05


def test_search_after_pruning_keeps_the_zeros(tmp_path):
  stages = [
    {"prune": {"method": "oneshot", "sparsity": 0.5, "target": "block_.*/mlp/.*kernel"}},
    {"search": {**SEARCH, "max_drop": 0.05, "target": "block_.*kernel"}},
  ]
  out = run_recipe(
    parse_recipe({"model": "tiny-lm", "stages": stages, "export": {"serving": None}})
  )
  flat = flatten(out.pipeline.tree)
  from jaxshrink.encoding import materialize

  for path in ("block_0/mlp/fc1/kernel", "block_3/mlp/fc2/kernel"):
    dense = np.asarray(materialize(flat[path]))
    assert np.mean(dense == 0) >= 0.49, path


def test_bad_input(tmp_path, capsys):
  unknown = _recipe(
    tmp_path, "unknown", [{"search": {**SEARCH, "candidates": ["int4-g128", "fp9"]}}]
  )
  assert main(["autocompress", unknown, "--out", str(tmp_path / "a")]) == 2
  assert "Unknown search candidate 'fp9'" in capsys.readouterr().err
  strict = {**SEARCH, "candidates": ["int4-g32"], "max_drop": 0.0}
  infeasible = _recipe(tmp_path, "infeasible", [{"search": strict}])
  assert main(["autocompress", infeasible, "--out", str(tmp_path / "b")]) == 1
  err = capsys.readouterr().err
  assert "cannot be met" in err and "already loses" in err
  tiny = _recipe(tmp_path, "tiny", [{"search": {**SEARCH, "max_bytes": 1000, "max_drop": None}}])
  assert main(["autocompress", tiny, "--out", str(tmp_path / "c")]) == 1
  assert "max_bytes: 1000" in capsys.readouterr().err
  with pytest.raises(UsageError, match="no candidate in"):
    fixed = {"candidates": ["float", "bf16"], "embeddings": {"bits": 8}}
    run_recipe(parse_recipe(_raw([{"search": fixed}])))
  with pytest.raises(UsageError, match="needs a budget"):
    run_recipe(parse_recipe({"model": "tiny-lm", "stages": [{"search": {"max_drop": None}}]}))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_recipe_out_is_never_overwritten_silently(searched, tmp_path, capsys):
  tmp, _ = searched
  existing = tmp_path / "r.yaml"
  existing.write_text("keep me\n")
  recipe = _recipe(tmp_path, "s", [{"search": SEARCH}])
  code = main(["autocompress", recipe, "--out", str(tmp_path / "o"), "--recipe-out", str(existing)])
  assert code == 2 and existing.read_text() == "keep me\n"
  assert "already exists" in capsys.readouterr().err


def test_validation_on_test_rows_for_a_model_trained_on_train():
  # digits-cnn is exact on its training images, so it verifies on the test split's first rows.
  stages = [{"search": {**SEARCH, "max_drop": 0.01, "validation_data": "test"}}]
  raw = {"model": "digits-cnn", "stages": stages, "export": {"serving": None}}
  out = run_recipe(parse_recipe(raw))
  entry = next(s for s in out.metrics["stages"] if s["stage"] == "search")["search"]
  assert entry["validation"]["data"] == "test" and entry["validation"]["rows"] == 256
  assert entry["validation"]["drop"] <= 0.01
  with pytest.raises(UsageError, match="validation_data"):
    stages = [{"search": {**SEARCH, "validation_data": "val"}}]
    run_recipe(parse_recipe({**raw, "stages": stages}))


def test_text_models_verify_on_held_out_corpus_sentences():
  # MiniLM's training sentences after calibration's are mostly docstrings; `auto` verifies on
  # the transfer corpus' last sentences instead, against the float model's embeddings.
  pytest.importorskip(MINILM_PACKAGE)
  from jaxshrink.data.corpus import transfer_tokens
  from jaxshrink.evaluation import evaluate_metrics
  from jaxshrink.recipes import prepare
  from jaxshrink.search.stage import OPTIONS
  from jaxshrink.search.validation import validation_rows, validation_source

  minilm = prepare(parse_recipe({"model": "minilm-l6", "data": "minilm-sentences", "stages": []}))
  options = {**OPTIONS, "validation_rows": 48}
  assert validation_source(minilm, options) == "corpus"
  rows = validation_rows(minilm, options)
  ids = transfer_tokens()[-48:]
  assert np.array_equal(rows.x_test, ids[:, : rows.x_test.shape[1]])
  assert not ids[:, rows.x_test.shape[1] :].any()
  assert evaluate_metrics(minilm.model, minilm.tree, rows)["value"] == pytest.approx(1.0, abs=1e-5)
  recovered = dataclasses.replace(minilm, log=({"recovered": {"data": "corpus (9)"}},))
  assert validation_source(recovered, options) == "train"
  digits = prepare(parse_recipe({"model": "digits-cnn", "stages": []}))
  assert validation_source(digits, options) == "train"
  with pytest.raises(UsageError, match="validation_data: corpus"):
    validation_rows(digits, {**options, "validation_data": "corpus"})


def test_search_after_recover_starts_from_the_recovered_pruned_tree():
  compress = [
    {"prune": {"method": "oneshot", "sparsity": 0.5, "target": "dense.*kernel"}},
    {"recover": {"steps": 30}},
  ]
  search = {**SEARCH, "max_drop": 0.01, "validation_data": "test"}
  raw = {"model": "digits-cnn", "export": {"serving": None}}
  out = run_recipe(parse_recipe({**raw, "stages": [*compress, {"search": search}]}))
  recovered = run_recipe(parse_recipe({**raw, "stages": compress})).pipeline
  entry = next(s for s in out.metrics["stages"] if s["stage"] == "search")["search"]
  from jaxshrink.evaluation import evaluate_metrics
  from jaxshrink.search.stage import OPTIONS
  from jaxshrink.search.validation import validation_rows

  rows = validation_rows(recovered, {**OPTIONS, **search})
  assert entry["validation"]["data"] == "test"
  assert (
    entry["validation"]["reference"]
    == evaluate_metrics(recovered.model, recovered.tree, rows)["value"]
  )
  assert entry["validation"]["drop"] <= 0.01
  from jaxshrink.encoding import materialize

  # Every weight the prune stage zeroed is still zero after the searched quantization.
  searched, pruned = flatten(out.pipeline.tree), flatten(recovered.tree)
  for path in ("dense1/kernel", "dense2/kernel"):
    zeros = np.asarray(materialize(pruned[path])) == 0
    assert np.all(np.asarray(materialize(searched[path]))[zeros] == 0), path
  assert np.mean(np.asarray(materialize(pruned["dense1/kernel"])) == 0) >= 0.49


@pytest.mark.parametrize(
  "data, words",
  [("corpus", "held-out sentences of the transfer corpus"), ("test", "test rows"),
   ("train", "training rows calibration never read"), ("elsewhere", "rows:")],
)  # fmt: skip
def test_the_report_names_the_rows_it_verified_on(data, words):
  from rich.console import Console

  from jaxshrink.search.cli import print_search

  console = Console(record=True, width=200)
  found = {"layers": [{"path": "k", "candidate": "int8", "bytes": 1, "error": 0.0}],
           "validation": {"rows": 256, "data": data, "value": 0.99, "reference": 1.0,
                          "drop": 0.01}, "iterations": [{}]}  # fmt: skip
  print_search(console, [{"stage": "search", "search": found}])
  assert f"verified on 256 {words}" in console.export_text()
