"""The API reference builds from the docstrings (pdoc), with a page per module and no
warnings: an annotation pdoc cannot resolve or a broken link fails here, in CI."""

import importlib.util
import warnings
from pathlib import Path

BUILD = Path(__file__).resolve().parents[1] / "docs" / "build_api.py"


def _builder():
  spec = importlib.util.spec_from_file_location("build_api", BUILD)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_reference_builds_a_page_per_module_without_warnings(tmp_path):
  builder = _builder()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pages = builder.build(tmp_path)
  pdoc_warnings = [
    str(w.message) for w in caught
    if "pdoc" in (w.filename or "") and not builder.NAMEDTUPLE_INIT.match(str(w.message))
  ]  # fmt: skip
  assert not pdoc_warnings, pdoc_warnings
  written = {p.relative_to(tmp_path).with_suffix("").as_posix().replace("/", ".") for p in pages}
  missing = set(builder.modules()) - written
  assert not missing, f"no API page for {sorted(missing)}"
  top = (tmp_path / "jaxshrink.html").read_text()
  for name in ("quantized_apply", "save", "load", "LayerQuant"):
    assert name in top
