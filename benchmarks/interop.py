"""interop: llama-tiny compressed here, exported, and run by transformers itself.

Each row compresses the trained `llama-tiny` with one recipe (the README's W4A16 g32 GPTQ
`examples/recipes/llama-tiny-w4a16-vllm.yaml`, and int8 W8A8 with dynamic activations), saves the
jaxshrink checkpoint and exports it with `jaxshrink.interop.hf.export_compressed_tensors`. Then,
in the same run:

- transformers (PyTorch CPU, float32) loads the compressed-tensors directory through its own
  compressed-tensors integration and scores the held-out test windows: `value` is its
  perplexity, `reference_value` jaxshrink's perplexity of the same compressed tree;
- `max_abs_logit_diff`: transformers' logits against ours on the first test windows;
- `decompression_exact`: compressed-tensors' own decompression of every module equals our
  dequantized weights (`np.array_equal`);
- bytes on disk of the compressed-tensors directory (`size_bytes`), of the float Hugging Face
  export of the float model (`float32_bytes`) and of the jaxshrink checkpoint (`extra`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxshrink import export, models
from jaxshrink.bench import Record
from jaxshrink.data import get_dataset
from jaxshrink.encoding import materialize
from jaxshrink.interop.hf import export_compressed_tensors, export_hf
from jaxshrink.recipes import load_recipe, parse_recipe, run_recipe

SUITE = "interop"
DESCRIPTION = (
  "llama-tiny compressed by jaxshrink, exported as compressed-tensors and run by transformers: "
  "its held-out perplexity against jaxshrink's on the same tree, logit difference, bit-exact "
  "decompression by the compressed-tensors package, and bytes on disk."
)
MODEL = "llama-tiny"
REPO = Path(__file__).resolve().parents[1]
ROWS = (
  ("W4A16 g32 GPTQ", REPO / "examples/recipes/llama-tiny-w4a16-vllm.yaml"),
  ("W8A8 dynamic", {"model": MODEL, "stages": [{"quantize": {
    "target": ".*proj/kernel", "weight_bits": 8, "activation_bits": 8}}]}),
)  # fmt: skip
LOGIT_WINDOWS = 8


def _torch_scores(directory: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
  """transformers' perplexity over (x, y) windows, and its logits of the first windows."""
  import torch
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  nll, count, first = 0.0, 0, None
  with torch.no_grad():
    for start in range(0, len(x), 16):
      logits = model(input_ids=torch.tensor(x[start : start + 16], dtype=torch.long)).logits
      if first is None:
        first = logits[:LOGIT_WINDOWS].numpy()
      logp = torch.log_softmax(logits.float(), dim=-1)
      targets = torch.tensor(y[start : start + 16], dtype=torch.long)
      nll += float(-logp.gather(-1, targets[..., None]).sum(dtype=torch.float64))
      count += targets.numel()
  return float(np.exp(nll / count)), first


def _decompression_exact(directory: Path, tree) -> bool:
  """compressed-tensors' decompressors give our dequantized kernels exactly, module by module."""
  import torch
  from compressed_tensors.compressors import BaseCompressor
  from compressed_tensors.quantization import QuantizationScheme
  from safetensors.torch import load_file

  from jaxshrink.interop.hf import hf_state

  config = json.loads((directory / "config.json").read_text())["quantization_config"]
  tensors = load_file(str(directory / "model.safetensors"))
  state = hf_state(tree, _model())
  for group in config["config_groups"].values():
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    for module in group["targets"]:
      local = {name[len(module) + 1 :]: t for name, t in tensors.items()
               if name.startswith(f"{module}.") and name != f"{module}.bias"}  # fmt: skip
      weight = compressor.decompress(local, scheme)["weight"].to(torch.float32).numpy()
      want = np.asarray(state[f"{module}.weight"][0].dequantized_matrix()).T
      if not np.array_equal(weight, want):
        return False
  return True


def _model():
  return models.get_model(MODEL)


def run() -> list[Record]:
  model = _model()
  params = models.pretrained(model, progress=False)
  dataset = get_dataset(model.data)
  x, y = np.asarray(dataset.x_test), np.asarray(dataset.y_test)
  tmp = Path(tempfile.mkdtemp(prefix="jaxshrink-interop-"))
  records = []
  try:
    float_dir = export_hf(params, model, tmp / "float")
    float_bytes = export.disk_bytes(float_dir)
    for label, source in ROWS:
      recipe = load_recipe(source) if isinstance(source, Path) else parse_recipe(source)
      out = run_recipe(recipe, progress=False)
      tree = out.pipeline.tree
      export.save(tmp / label, tree, model=MODEL)
      start = time.perf_counter()
      ct_dir = export_compressed_tensors(tree, model, tmp / f"{label}-ct")
      seconds = time.perf_counter() - start
      value, logits = _torch_scores(ct_dir, x, y)
      ours = np.asarray(jax.jit(model.apply)(materialize(tree), x[:LOGIT_WINDOWS]))
      records.append(Record(
        suite=SUITE, model=MODEL, method=f"{label} -> compressed-tensors", metric="perplexity",
        value=value, reference_value=out.metrics["value"], size_bytes=export.disk_bytes(ct_dir),
        float32_bytes=float_bytes, seconds=round(seconds, 2),
        extra={"max_abs_logit_diff": float(np.abs(logits - ours).max()),
               "decompression_exact": _decompression_exact(ct_dir, tree),
               "jaxshrink_checkpoint_bytes": export.disk_bytes(tmp / label),
               "float_perplexity": out.metrics["reference_value"]},
      ))  # fmt: skip
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return records


def summarize(records: list[Record]) -> str:
  """One line per row: transformers' perplexity against ours, exactness and bytes."""
  lines = []
  for r in records:
    lines.append(
      f"{r.method}: transformers {r.value:.4f} vs jaxshrink {r.reference_value:.4f} "
      f"(float {r.extra['float_perplexity']:.4f}); max |logit diff| "
      f"{r.extra['max_abs_logit_diff']:.2e}; decompression exact: "
      f"{r.extra['decompression_exact']}; {r.size_bytes / 2**20:.2f} MiB against "
      f"{r.float32_bytes / 2**20:.2f} MiB float (jaxshrink checkpoint "
      f"{r.extra['jaxshrink_checkpoint_bytes'] / 2**20:.2f} MiB)."
    )
  return "\n".join(lines)
