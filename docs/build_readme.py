"""Regenerates the technique sections of README.md from docs/readme/*.md.

Each technique's section is written next to its code (docs/readme/<topic>.md) and spliced
into the README between the `techniques` markers, in the order below. Run after editing one:
`python docs/build_readme.py`; a test fails when the README is out of date.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = (
  "quantization.md",
  "gptq-awq.md",
  "sparsity.md",
  "distillation-lowrank.md",
  "checkpoints.md",
  "real-model.md",
  "scale-out.md",
  "notebooks.md",
)
START, END = "<!-- techniques:start -->", "<!-- techniques:end -->"


def render() -> str:
  readme = (ROOT / "README.md").read_text()
  head, rest = readme.split(START, 1)
  _, tail = rest.split(END, 1)
  parts = [
    (ROOT / "docs" / "readme" / name).read_text().strip()
    for name in ORDER
    if (ROOT / "docs" / "readme" / name).is_file()
  ]
  return head + START + "\n" + "\n\n".join(parts) + "\n" + END + tail


if __name__ == "__main__":
  (ROOT / "README.md").write_text(render())
