"""Renders the technique pages docs/<topic>.md from docs/readme/<topic>.md, and README.md's
list of them, filling every measured number from benchmark results.

Each technique's page is written in docs/readme/<topic>.md and rendered to docs/<topic>.md
(the README stays short: pitch, the two commands, quickstart, CLI, recipes and links); the
README lists the pages between the `techniques` markers, in the order below. Links are
written as if the page sat at the repository root (`BENCHMARKS.md`, `#compress-a-real-model`):
a relative path gains `../`, and an anchor defined on another page (or in the README) points
there. A measured number is
never typed into a section: the section names the benchmark record it comes from, and this
script fills it in from `benchmarks/results/<suite>.json`:

  {{checkpoint_size: digits-cnn / jaxshrink int8 per-channel / ratio | .2f}}x smaller

reads `SUITE: MODEL / METHOD [/ FIELD] | FORMAT`. FIELD is a record field (`value`, the
default; `reference_value`, `size_bytes`, `float32_bytes`, `seconds`), `extra.KEY`, `ratio`
(float32 bytes over stored bytes) or `delta` (value minus reference). FORMAT is a Python
format spec (`.4f`, `,.0f`), a spec after a scale (`pct .2f` for percent, `MB .2f` for
megabytes), or one of ROW_FORMATS below (a whole table row, an accuracy with its image count
on the 360 digits test images). Where one model and method name several records (a suite run
on two settings), `METHOD [KEY=VALUE]` picks the one whose `extra[KEY]` is VALUE, and
`METHOD [#N]` the N-th.

A paragraph or list item that held a placeholder is rewrapped to 100 columns once filled.
Run after editing a section or rerunning a benchmark: `python docs/build_readme.py`.
`tests/test_readme.py` fails when the README or a page is out of date, when a link does not
resolve, when a placeholder names no
record, or when a number with three or more significant digits (or a decimal with two) is
typed outside a placeholder, in a section or in the README's own text around the sections,
and is not one of the static facts in STATIC_NUMBERS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxshrink.bench import DIGITS_TEST_IMAGES, digits_difference, digits_images

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ORDER = (
  "quantization.md",
  "gptq-awq.md",
  "sparsity.md",
  "distillation-lowrank.md",
  "hybrids.md",
  "recovery.md",
  "structured.md",
  "search.md",
  "checkpoints.md",
  "serving.md",
  "interop.md",
  "real-model.md",
  "llm.md",
  "scale-out.md",
  "notebooks.md",
)
START, END = "<!-- techniques:start -->", "<!-- techniques:end -->"
PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
SCALES = {"pct": 100.0, "MB": 1e-6}

# Numbers with three or more significant digits (or decimals) that are facts of the code, the
# data or the model definitions rather than measurements, so they are typed, not looked up.
STATIC_NUMBERS = {
  "0.20": "the compressed-tensors release the interop page describes",
  "127": "the largest int8 code",
  "127.5": "compressed-tensors' int8 activation divisor, a format constant",
  "1056": "llama-tiny's MLP width from its definition",
  "0.28": "one of the 360 digits test images, in accuracy points",
  "128": "group size, layer width",
  "256": "layer width, calibration windows",
  "384": "MiniLM hidden size",
  "1024": "layer widths (digits-cnn dense1 input, the 1024^3 dense benchmark)",
  "2048": "the 2048x2048 low-rank benchmark layer",
  "4096": "the 4096x1024 kernel of the device-memory benchmark",
  "1437": "digits training images",
  "512": "sequence limit, calibration images and sentences",
  "22.6M": "MiniLM parameter count from its definition",
  "2.67": "N:M pattern rank storage: 8 bits for three 2:4 groups",
  "0.55": "AWQ's clipping search range (0.55-1), an algorithm constant",
}


class PlaceholderError(ValueError):
  """A placeholder that names no record, an unknown field, or a format that does not apply."""


def load_results(directory: Path = RESULTS) -> dict[str, list[dict[str, Any]]]:
  """Every stored suite's records, by suite name."""
  return {
    path.stem: json.loads(path.read_text())["records"] for path in sorted(directory.glob("*.json"))
  }


def find_record(results: dict[str, list[dict]], suite: str, model: str, method: str) -> dict:
  """The one record of `suite` with this model and method (`method [key=value]` narrows)."""
  if suite not in results:
    raise PlaceholderError(f"No results for suite `{suite}`; stored: {', '.join(results)}.")
  match = re.fullmatch(r"(.*?)\s*\[(?:#(\d+)|(\w+)=(.*))\]", method)
  name, index, key, wanted = match.groups() if match else (method, None, None, None)
  rows = [r for r in results[suite] if r["model"] == model and r["method"] == name]
  if key is not None:
    rows = [r for r in rows if str(r["extra"].get(key)) == wanted]
  if index is not None:  # the n-th of several identical rows (a teacher measured per setting)
    rows = rows[int(index) - 1 : int(index)]
  if len(rows) != 1:
    methods = sorted({r["method"] for r in results[suite] if r["model"] == model})
    raise PlaceholderError(
      f"`{suite}: {model} / {method}` matches {len(rows)} records, expected 1. Methods of "
      f"`{model}` in {suite}.json: {methods or 'none'}; add `[KEY=VALUE]` on an `extra` key "
      "or `[#N]` (the N-th) to pick one of several."
    )
  return rows[0]


def field_value(record: dict, field: str) -> Any:
  """A record field, `extra.KEY`, `ratio` (float32 bytes / stored bytes) or `delta`."""
  if field == "ratio":
    value = (
      record["float32_bytes"] / record["size_bytes"]
      if record["size_bytes"] and record["float32_bytes"]
      else None
    )
  elif field == "delta":
    value = (
      None
      if record["value"] is None or record["reference_value"] is None
      else record["value"] - record["reference_value"]
    )
  elif field.startswith("extra."):
    value = record["extra"].get(field.removeprefix("extra."))
  elif field in ("value", "reference_value", "size_bytes", "float32_bytes", "seconds"):
    value = record[field]
  else:
    raise PlaceholderError(
      f"Unknown field `{field}`; use value, reference_value, size_bytes, float32_bytes, "
      "seconds, ratio, delta or extra.KEY."
    )
  if value is None:
    raise PlaceholderError(f"`{field}` of `{record['model']} / {record['method']}` is empty.")
  return value


def _digits_check(record: dict) -> None:
  if not (record["model"].startswith("digits") and record["metric"] == "accuracy"):
    raise PlaceholderError(
      f"`{record['model']} / {record['method']}` is not an accuracy on the digits test "
      "split; image counts apply to digits accuracies only."
    )


def _accuracy_images(record: dict, value: Any) -> str:
  """`98.89% (-2)`: a digits accuracy and the test images it gains or loses against float."""
  _digits_check(record)
  images = digits_images(record["value"], record["reference_value"])
  return f"{100 * record['value']:.2f}% ({f'{images:+d}' if images else '0'})"


def _points(record: dict, value: Any) -> str:
  """`-0.56 points (2 of 360 images)`: a digits accuracy change against float."""
  _digits_check(record)
  return digits_difference(record["value"], record["reference_value"])


def _images(record: dict, value: Any) -> str:
  """`2 of 360 images`: how many digits test images the accuracy change is."""
  _digits_check(record)
  images = abs(digits_images(record["value"], record["reference_value"]))
  return f"{images} of {DIGITS_TEST_IMAGES} images"


def _minilm_row(record: dict, value: Any) -> str:
  """The numeric cells of one row of the README's MiniLM table."""
  extra, mb = record["extra"], record["size_bytes"] / 1e6
  seconds = "–" if record["method"] == "float32" else f"{record['seconds']:.0f}"
  cells = (
    f"{record['value']:.4f}",
    f"{extra['min_cosine']:.4f}",
    f"{extra['neighbour_agreement']:.3f}",
    f"{mb:.1f} MB",
    f"{extra['disk_ratio']:.2f}x",
    seconds,
    f"{extra['inference_vs_float']:.2f}x",
  )
  return " | ".join(cells)


def _max_diff(record: dict, value: Any) -> str:
  """`outputs identical`, or `outputs within 4.8e-07` (the largest absolute difference)."""
  return "outputs identical" if value == 0 else f"outputs within {value:.1e}"


def _student_errors(record: dict, value: Any) -> str:
  """`7.0 (8/6/7)`: mean test errors over the seeds, and each seed's count."""
  return f"{record['value']:.1f} ({record['extra']['errors_per_seed']})"


ROW_FORMATS: dict[str, Callable[[dict, Any], str]] = {
  "accuracy+images": _accuracy_images,
  "points": _points,
  "images": _images,
  "max-diff": _max_diff,
  "minilm-row": _minilm_row,
  "student-errors": _student_errors,
}


def format_value(record: dict, value: Any, spec: str) -> str:
  if spec in ROW_FORMATS:
    return ROW_FORMATS[spec](record, value)
  scale, _, rest = spec.partition(" ")
  if scale in SCALES and rest:
    value, spec = value * SCALES[scale], rest
  try:
    return format(value, spec)
  except (TypeError, ValueError) as error:
    raise PlaceholderError(
      f"Format `{spec}` does not apply to {value!r} ({error}); use a Python format spec, "
      f"`pct SPEC`, `MB SPEC` or one of {', '.join(ROW_FORMATS)}."
    ) from error


def fill(body: str, results: dict[str, list[dict]]) -> str:
  """The text for one placeholder body `SUITE: MODEL / METHOD [/ FIELD] | FORMAT`."""
  where, bar, spec = body.rpartition("|")
  suite, colon, path = where.partition(":")
  parts = [p.strip() for p in path.split(" / ")]
  if not (bar and colon and len(parts) in (2, 3)):
    raise PlaceholderError(
      f"Placeholder `{{{{{body}}}}}` is not `SUITE: MODEL / METHOD [/ FIELD] | FORMAT`."
    )
  record = find_record(results, suite.strip(), parts[0], parts[1])
  field = parts[2] if len(parts) == 3 else "value"
  # A row format given no field reads the record itself; one given a field gets its value.
  value = None if spec.strip() in ROW_FORMATS and len(parts) == 2 else field_value(record, field)
  return format_value(record, value, spec.strip())


def placeholders(text: str) -> list[str]:
  """The bodies of every placeholder in `text`."""
  return [" ".join(m.group(1).split()) for m in PLACEHOLDER.finditer(text)]


def _sections() -> dict[str, str]:
  """`{topic: section source}` in README order."""
  folder = ROOT / "docs" / "readme"
  return {name: (folder / name).read_text().strip() for name in ORDER if (folder / name).is_file()}


def template() -> str:
  """README's own text and every section, placeholders left in place (what the checks scan)."""
  return "\n\n".join([(ROOT / "README.md").read_text(), *_sections().values()])


def anchor(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
  """Every heading anchor of a markdown text (code blocks skipped)."""
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  return {anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def _relink(text: str, own: set[str], elsewhere: dict[str, str], up: str) -> str:
  """Rewrites link targets for a page `up` levels below the root (see the module docstring)."""

  def fix(match: re.Match) -> str:
    target = match.group(2)
    if target.startswith("#"):
      name = target[1:]
      if name not in own and name in elsewhere:
        target = elsewhere[name] + target
    elif not re.match(r"[a-z]+:|\.\./|/", target):
      target = up + target
    return match.group(1) + target + match.group(3)

  parts = re.split(r"(```.*?```)", text, flags=re.S)
  return "".join(p if i % 2 else LINK.sub(fix, p) for i, p in enumerate(parts))


def _fill(text: str, results: dict[str, list[dict]]) -> str:
  """Every placeholder of `text` filled; filled prose and list items rewrapped."""

  def sub(text: str) -> str:
    return PLACEHOLDER.sub(lambda m: fill(" ".join(m.group(1).split()), results), text)

  out = []
  for i, chunk in enumerate(re.split(r"(```.*?```)", text, flags=re.S)):
    if i % 2:  # a code block: verbatim
      out.append(chunk)
      continue
    parts = re.split(r"(\n[ \t]*\n)", chunk)
    for j, part in enumerate(parts):
      body = part.strip("\n")
      if j % 2 or not body:
        out.append(part)
        continue
      lead, trail = part[: part.index(body)], part[part.index(body) + len(body) :]
      out.append(lead + _fill_block(body, sub) + trail)
  return "".join(out)


def render_pages(results: dict[str, list[dict]] | None = None) -> dict[Path, str]:
  """`{path: text}` of README.md and every docs/<topic>.md page, numbers filled."""
  results = load_results() if results is None else results
  sections = _sections()
  readme = (ROOT / "README.md").read_text()
  head, rest = readme.split(START, 1)
  _, tail = rest.split(END, 1)
  titles = {n: re.match(r"#+ (.+)", text).group(1) for n, text in sections.items()}
  listing = "Every page: " + " · ".join(f"[{titles[n]}](docs/{n})" for n in sections) + "."
  readme = head + START + "\n" + listing + "\n" + END + tail
  where = {a: f"docs/{n}" for n, text in sections.items() for a in anchors(text)}
  own = anchors(readme)
  readme_links = {a: "../README.md" for a in own}
  pages = {ROOT / "README.md": _relink(readme, own, where, "")}
  for name, text in sections.items():
    mine = anchors(text)
    others = {**readme_links, **{a: p.removeprefix("docs/") for a, p in where.items()}}
    body = _relink(text, mine, others, "../")
    header = f"<!-- Generated by docs/build_readme.py from docs/readme/{name}: edit that. -->"
    pages[ROOT / "docs" / name] = header + "\n\n" + _fill(body, results) + "\n"
  return pages


WIDTH = 100
# A wrapped line must not start like a list item, heading, table row or quote.
BLOCK_START = re.compile(r"[-+*] |#|\||>|\d+\. ")


def _wrap(text: str, first: str, rest: str) -> list[str]:
  """Greedy word wrap to WIDTH that never starts a line with a Markdown block marker."""
  lines: list[str] = []
  for word in text.split():
    if not lines:
      lines.append(first + word)
    elif len(lines[-1]) + 1 + len(word) <= WIDTH:
      lines[-1] += " " + word
    else:
      lines.append(rest + word)
  for i in range(len(lines) - 1, 0, -1):
    if BLOCK_START.match(lines[i].strip()):
      lines[i - 1] += " " + lines.pop(i).strip()
  return lines


def _fill_block(block: str, sub: Callable[[str], str]) -> str:
  """Fills the placeholders of one paragraph; filled prose and list items are rewrapped."""
  units: list[list[str]] = []
  for line in block.split("\n"):
    fresh = line.startswith(("#", "|", "- ")) or not units or units[-1][0].startswith(("#", "|"))
    if fresh:
      units.append([line])
    else:
      units[-1].append(line)
  out = []
  for unit in units:
    text = "\n".join(unit)
    if "{{" not in text or text.startswith(("#", "|")):
      out.append(sub(text))
    elif text.startswith("- "):
      out += _wrap(sub(text)[2:], "- ", "  ")
    else:
      out += _wrap(sub(text), "", "")
  return "\n".join(out)


def _blank(match: re.Match) -> str:
  return "\n" * match.group().count("\n") + " "  # keeps line numbers


def typed_numbers(text: str) -> list[tuple[int, str]]:
  """(line, number) for numbers in `text` outside placeholders, code and links that look measured.

  A number counts when it has three or more significant digits (`1437`, `0.516`, `606,551`)
  or is a decimal with two or more (`3.9`, `0.95`); `0.5`, `360`, `2:4`, `int8`, `v2`, version
  numbers (`0.1.8`) and citation years (`et al., 2022`) do not.
  """
  for pattern in (
    PLACEHOLDER.pattern,
    r"```.*?```",  # code blocks
    r"`[^`\n]*`",  # inline code
    r"\]\([^)]*\)|https?://\S+|<!--.*?-->",  # link targets, comments
    r"et al\., \d{4}",  # citation years
  ):
    text = re.sub(pattern, _blank, text, flags=re.S)
  found = []
  for match in re.finditer(r"(?<![\w.,/-])\d[\d,]*(?:\.\d+)*[MK]?", text):
    token = match.group().rstrip(",")
    number = token.rstrip("MK").replace(",", "")
    if number.count(".") > 1:
      continue  # a version number
    digits = number.replace(".", "").lstrip("0")
    significant = len(digits) if "." in number else len(digits.rstrip("0"))
    if significant >= 3 or ("." in number and significant >= 2):
      found.append((text.count("\n", 0, match.start()) + 1, token))
  return found


def unexplained_numbers(text: str) -> list[tuple[int, str]]:
  """`typed_numbers` of `text` that are not listed in STATIC_NUMBERS."""
  return [(line, n) for line, n in typed_numbers(text) if n not in STATIC_NUMBERS]


if __name__ == "__main__":
  for path, text in render_pages().items():
    path.write_text(text)
