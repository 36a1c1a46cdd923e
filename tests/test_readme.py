"""The README's quickstart runs as written, its measured numbers come from the benchmark results,
and the public names stay pinned."""

import copy
import re
from pathlib import Path

import pytest

import jaxshrink

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
  text = README.read_text()
  first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
  assert first_block == ['pip install -e ".[dev]" && jaxshrink demo', "python -m pytest -q -n 2"]
  ci = (README.parent / ".ci" / "run").read_text()
  assert ci.strip().splitlines()[-1] == first_block[1]


def _build_readme():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "build_readme", README.parent / "docs" / "build_readme.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


build = _build_readme()


def test_readme_and_technique_pages_are_current():
  for path, text in build.render_pages().items():
    assert path.read_text() == text, f"{path} is stale: run `python docs/build_readme.py`"


def test_readme_is_short():
  assert len(README.read_text().splitlines()) < 400  # technique pages live in docs/


def _links(path: Path) -> list[str]:
  text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
  return [m.group(2) for m in build.LINK.finditer(text)]


def test_every_link_resolves():
  pages = [README, *(README.parent / "docs" / name for name in build.ORDER)]
  broken = []
  for page in pages:
    for target in _links(page):
      if re.match(r"[a-z]+:", target):
        continue  # http(s): not checked offline
      file, _, fragment = target.partition("#")
      where = (page.parent / file).resolve() if file else page
      if not where.exists():
        broken.append(f"{page.name}: {target} (no such file)")
      elif fragment and fragment not in build.anchors(where.read_text()):
        broken.append(f"{page.name}: {target} (no such heading)")
  assert broken == []


def test_every_placeholder_names_one_stored_record():
  results = build.load_results()
  bodies = build.placeholders(build.template())
  assert len(bodies) > 250  # the measured numbers of every section
  failures = []
  for body in bodies:
    try:
      build.fill(body, results)
    except build.PlaceholderError as error:
      failures.append(str(error))
  assert failures == []


def test_no_measured_number_is_typed_by_hand():
  typed = build.unexplained_numbers(build.template())
  assert typed == [], (
    "numbers typed into README sections (line, number): use a {{suite: model / method | "
    f"format}} placeholder, or list a static fact in STATIC_NUMBERS: {typed}"
  )


def test_every_allowed_static_number_is_still_used():
  used = {number for _, number in build.typed_numbers(build.template())}
  assert set(build.STATIC_NUMBERS) <= used, set(build.STATIC_NUMBERS) - used


def test_number_scan_counts_significant_digits_outside_code_and_placeholders():
  text = (
    "accuracy 0.9944 on 360 images at 0.5 sparsity, int8 g128 (v2), `1.23` and\n"
    "{{s: m / x | .2f}}x, qwix 0.1.8, 1,437 images, 3.9x, 200 steps, 2:4, [a](https://x/2210.17323)\n"
    "```\n4.0312\n```\n(Hinton et al., 2015) 22.6M params"
  )
  assert build.typed_numbers(text) == [
    (1, "0.9944"), (2, "1,437"), (2, "3.9"), (6, "22.6M")
  ]  # fmt: skip


def test_a_result_that_changes_changes_the_readme():
  results = copy.deepcopy(build.load_results())
  row = build.find_record(results, "checkpoint_size", "digits-cnn", "jaxshrink int8 per-channel")
  row["size_bytes"] = 155427
  page = build.render_pages(results)[README.parent / "docs" / "quantization.md"]
  assert "155,427 against 606,551 bytes" in page
  assert page != (README.parent / "docs" / "quantization.md").read_text()


DIGITS_ROW = {"model": "digits-cnn", "method": "m", "metric": "accuracy", "extra": {},
              "value": 0.9888888888888889, "reference_value": 0.9944444444444445,
              "size_bytes": 100, "float32_bytes": 400, "seconds": None}  # fmt: skip
LM_ROW = {**DIGITS_ROW, "model": "tiny-lm", "metric": "perplexity", "value": 4.8}
RESULTS = {"toy": [DIGITS_ROW, LM_ROW, {**DIGITS_ROW, "method": "twice"},
                   {**DIGITS_ROW, "method": "twice", "extra": {"seed": 1}}]}  # fmt: skip


@pytest.mark.parametrize(
  "body, text",
  [
    ("toy: digits-cnn / m / delta | points", "-0.56 points (2 of 360 images)"),
    ("toy: digits-cnn / m / delta | images", "2 of 360 images"),
    ("toy: digits-cnn / m | accuracy+images", "98.89% (-2)"),
    ("toy: digits-cnn / m | pct .2f", "98.89"),
    ("toy: digits-cnn / m / ratio | .2f", "4.00"),
    ("toy: digits-cnn / m / size_bytes | ,d", "100"),
    ("toy: tiny-lm / m | .3f", "4.800"),
    ("toy: digits-cnn / twice [seed=1] / extra.seed | d", "1"),
    ("toy: digits-cnn / twice [#2] / extra.seed | d", "1"),
  ],
)
def test_placeholder_formats(body, text):
  assert build.fill(body, RESULTS) == text


@pytest.mark.parametrize(
  "body, match",
  [
    ("nope: digits-cnn / m | .2f", "No results for suite `nope`"),
    ("toy: digits-cnn / gone | .2f", r"matches 0 records, expected 1.*Methods of `digits-cnn`"),
    ("toy: digits-cnn / twice | .2f", r"matches 2 records.*\[KEY=VALUE\]"),
    ("toy: digits-cnn / m / speed | .2f", "Unknown field `speed`"),
    ("toy: digits-cnn / m / seconds | .2f", "`seconds` of `digits-cnn / m` is empty"),
    ("toy: digits-cnn / m | .2q", "Format `.2q` does not apply"),
    ("toy: tiny-lm / m / delta | points", "not an accuracy on the digits test split"),
    ("toy digits-cnn m .2f", "is not `SUITE: MODEL / METHOD"),
  ],
)
def test_placeholder_errors_name_the_problem(body, match):
  with pytest.raises(build.PlaceholderError, match=match):
    build.fill(body, RESULTS)


def test_filled_prose_is_rewrapped_without_starting_a_markdown_block():
  fill = lambda s: s.replace("{{toy: digits-cnn / m / ratio | .2f}}", "4.00")  # noqa: E731
  item = "- " + "x" * 92 + " {{toy: digits-cnn / m / ratio | .2f}}x + int4, 2 of 4 kept"
  # A greedy wrap at 100 columns would start the second line with "+ int4": a nested list.
  assert build._fill_block(item, fill).split("\n") == [
    "- " + "x" * 92 + " 4.00x + int4, 2 of 4 kept"
  ]
  prose = "word " * 25 + "{{toy: digits-cnn / m / ratio | .2f}}x " + "more " * 20
  lines = build._fill_block(prose, fill).split("\n")
  assert [len(line) for line in lines] == [99, 100, 29]  # 20 words of 5 columns a line
  assert lines[1].startswith("word word word word word 4.00x more")


def test_quickstart_runs(tmp_path, monkeypatch):
  code = re.search(r"## Quickstart \(Python\)\n\n```python\n(.*?)```", README.read_text(), re.S)
  monkeypatch.chdir(tmp_path)
  namespace: dict = {}
  exec(compile(code.group(1), "README quickstart", "exec"), namespace)  # noqa: S102
  assert namespace["logits"].shape == (360, 10)
  assert (tmp_path / "out" / "digits-bf16" / "manifest.json").is_file()
  assert set(jaxshrink.flatten(namespace["restored"])) == set(
    jaxshrink.flatten(namespace["params"])
  )


PUBLIC = {
  "Compressed",
  "Linen",
  "as_functional",
  "serve",
  "BitmaskSparse",
  "Cast",
  "CheckpointError",
  "DistillLoss",
  "Encoding",
  "JaxshrinkError",
  "LayerQuant",
  "LowRank",
  "NMSparse",
  "NoMatchError",
  "Pruner",
  "QArray",
  "QuantDotGeneral",
  "QuantRule",
  "QuantSpec",
  "Rule",
  "UsageError",
  "awq",
  "cast_params",
  "distill_step",
  "export_safetensors",
  "factorize",
  "flatten",
  "from_qwix",
  "gptq",
  "import_safetensors",
  "load",
  "lowrank_apply",
  "map_selected",
  "materialize",
  "oneshot_prune",
  "pruned_masks",
  "pruning",
  "ptq",
  "qat_apply",
  "quantize",
  "quantize_params",
  "quantized_apply",
  "read_manifest",
  "register_encoding",
  "save",
  "select",
  "shrink_params",
  "sparsegpt",
  "tree_report",
  "wanda",
}


def test_public_names_are_pinned():
  assert set(jaxshrink.__all__) == PUBLIC
  assert all(hasattr(jaxshrink, name) for name in PUBLIC)
