"""Worker of the `peers_llm` suite: one peer quantizes a Hugging Face Llama, scored in PyTorch.

Run by `benchmarks/peers_llm.py` with the peer's own venv (`.venv-peers-llm/<peer>/`), never
imported by jaxshrink (it imports torch and the peer, which the main venv does not hold):

  python -P peers_llm_worker.py PEER GROUP HF_DIR DATA.npz OUT.json WORK_DIR

(`-P`: the script's folder stays off `sys.path`, where `benchmarks/profile.py` would shadow the
standard library's `profile`, which torch imports.)

`DATA.npz` holds `calibration` (N, T) token ids and the test windows `x_test`, `y_test` (M, T).
The worker scores the float model, quantizes it (int4, asymmetric, groups of GROUP input
channels, every Linear including `lm_head`), scores the result and writes JSON:
`float_perplexity`, `perplexity`, `kl` and `top1_agreement` against float, `seconds` (the
quantization alone), `size_bytes` (the peer's saved checkpoint), `versions`, `settings`; or
`error` with the exception when a step fails, so the suite can report why.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

EVAL_BATCH = 32
PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "auto-round")


def versions() -> dict[str, str]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def score(model, x: np.ndarray, y: np.ndarray, reference=None) -> dict[str, float]:
  """`perplexity`: `exp` of the mean token NLL of `y` under `model(x)`, jaxshrink's definition
  (`models.evaluate`: each window scored against its own shifted targets, the sum kept in
  float64 on the host). With a `reference` (float) model also `kl`, the mean per-token
  KL(reference || model) in nats, and `top1_agreement`, the share of positions where both rank
  the same token first: int4 moves llama-tiny's perplexity by hundredths of a percent, which
  these resolve better."""
  totals = {"nll": 0.0, "kl": 0.0, "agree": 0.0}
  count = 0
  with torch.inference_mode():
    for start in range(0, len(x), EVAL_BATCH):
      ids = torch.from_numpy(np.asarray(x[start : start + EVAL_BATCH], np.int64))
      targets = torch.from_numpy(np.asarray(y[start : start + EVAL_BATCH], np.int64))
      logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
      totals["nll"] += float(-logp.gather(-1, targets[..., None]).sum(dtype=torch.float64))
      if reference is not None:
        ref = torch.log_softmax(reference(input_ids=ids).logits.float(), dim=-1)
        totals["kl"] += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
        totals["agree"] += float((ref.argmax(-1) == logp.argmax(-1)).sum())
      count += targets.numel()
  out = {"perplexity": math.exp(totals["nll"] / count)}
  if reference is not None:
    out.update(kl=totals["kl"] / count, top1_agreement=totals["agree"] / count)
  return out


def load(model_dir: Path) -> torch.nn.Module:
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  return model.eval()


def id_tokenizer(vocab_size: int):
  """A stand-in tokenizer whose token `str(i)` is id `i`: `oneshot` and `AutoRound` refuse to
  run without one even when the calibration data is token ids (neither tokenizes them)."""
  from tokenizers import Tokenizer
  from tokenizers.models import WordLevel
  from transformers import PreTrainedTokenizerFast

  vocab = {str(i): i for i in range(vocab_size)}
  return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="0")))


def llm_compressor(model, calibration: np.ndarray, group: int) -> tuple[object, dict, object]:
  """GPTQ through `oneshot`: W4A16_ASYM's int4 asymmetric groups (of `group`), every Linear
  including `lm_head` (the preset's examples ignore it; ours quantizes it), damping 0.01,
  static act-order, the sequential pipeline (one decoder layer at a time, on the outputs of the
  layers already quantized)."""
  from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
  from datasets import Dataset
  from llmcompressor import oneshot
  from llmcompressor.modifiers.gptq import GPTQModifier

  settings = {
    "weights": "int4 asymmetric", "group_size": group, "targets": "Linear", "ignore": [],
    "dampening_frac": 0.01, "actorder": "static", "block_size": 128, "pipeline": "sequential",
    # Lifts the up-front refusal of a K that is no multiple of the group (llama-tiny's 320 and
    # 1056 at g128), so a failure shows where the library itself stops, not just the guard.
    "bypass_divisibility_checks": True,
  }  # fmt: skip
  data = Dataset.from_dict({
    "input_ids": calibration.astype(np.int64).tolist(),
    "attention_mask": np.ones_like(calibration, np.int64).tolist(),
  })  # fmt: skip
  # W4A16_ASYM's weights with the group size made explicit (the preset fixes 128).
  weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group,
                             symmetric=False, dynamic=False)  # fmt: skip
  scheme = QuantizationScheme(targets=[settings["targets"]], weights=weights)
  recipe = GPTQModifier(
    config_groups={"group_0": scheme}, ignore=settings["ignore"],
    dampening_frac=settings["dampening_frac"], actorder=settings["actorder"],
    block_size=settings["block_size"],
    bypass_divisibility_checks=settings["bypass_divisibility_checks"],
  )  # fmt: skip
  start = time.perf_counter()
  model = oneshot(
    model=model, dataset=data, recipe=recipe, num_calibration_samples=len(calibration),
    max_seq_length=calibration.shape[1], shuffle_calibration_samples=False,
    pipeline=settings["pipeline"], batch_size=16,
    processor=id_tokenizer(model.config.vocab_size),
  )  # fmt: skip
  settings["seconds"] = time.perf_counter() - start

  def save(out: Path) -> None:
    # Its own compressed-tensors format (packed int4 + scales + zero points).
    model.save_pretrained(out, save_compressed=True)

  return model, settings, save


def auto_round(model, calibration: np.ndarray, group: int) -> tuple[object, dict, object]:
  """AutoRound's default algorithm (SignRound: signed-gradient descent on each block's rounding
  offsets and min/max clipping, `AUTOROUND_ITERS` steps, its default 200) with int4 asymmetric
  groups (of `group`), `lm_head` included (`quant_lm_head`; AutoRound rounds it to nearest, it
  tunes decoder blocks only). Calibration batches of 8 windows, its default batch size."""
  from auto_round import AutoRound, SignRoundConfig
  from auto_round.schemes import QuantizationScheme

  iters = int(os.environ.get("AUTOROUND_ITERS", "200"))
  batch = 8
  settings = {
    "weights": "int4 asymmetric", "group_size": group, "quant_lm_head": True, "iters": iters,
    "algorithm": "signround (default)", "batch_size": batch, "nsamples": len(calibration),
    "seqlen": calibration.shape[1],
  }  # fmt: skip
  ids = torch.from_numpy(calibration.astype(np.int64))
  # The windows hold no padding: an explicit all-ones mask keeps AutoRound from guessing pads
  # (it masks trailing repeated tokens and the last position when it builds a mask itself).
  batches = [{"input_ids": part, "attention_mask": torch.ones_like(part)}
             for part in ids.split(batch)]  # fmt: skip
  scheme = QuantizationScheme(bits=4, group_size=group, sym=False, data_type="int")
  start = time.perf_counter()
  rounder = AutoRound(
    model, tokenizer=id_tokenizer(model.config.vocab_size), scheme=scheme, dataset=batches,
    alg_configs=SignRoundConfig(iters=iters), nsamples=len(ids), seqlen=ids.shape[1],
    batch_size=batch, quant_lm_head=True, device_map="cpu", seed=0,
  )  # fmt: skip
  model, _ = rounder.quantize()
  settings["seconds"] = time.perf_counter() - start

  def save(out: Path) -> None:
    # Its own format, packed int4 (asymmetric groups pack through its GPTQ layout).
    rounder.save_quantized(str(out), format="auto_gptq")

  return model, settings, save


PEERS = {"llm-compressor": llm_compressor, "auto-round": auto_round}


def main(argv: list[str]) -> int:
  peer, group, model_dir, data_path, out_path, work = argv
  group, work = int(group), Path(work)
  work.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  result: dict = {"peer": peer, "group_size": group, "versions": versions()}
  step = "load"
  try:
    data = np.load(data_path)
    model = load(Path(model_dir))
    step = "float perplexity"
    result["float_perplexity"] = score(model, data["x_test"], data["y_test"])["perplexity"]
    reference = copy.deepcopy(model)  # the peers quantize in place
    step = "quantize"
    model, settings, save = PEERS[peer](model, np.asarray(data["calibration"]), group)
    result["seconds"] = settings.pop("seconds")
    result["settings"] = settings
    step = "quantized perplexity"
    # Scored before saving: a save may pack the weights in place.
    result.update(score(model, data["x_test"], data["y_test"], reference))
    # The saved checkpoint only gives its size: a failure to save is noted, not fatal.
    out = work / f"{peer}-g{group}"
    try:
      save(out)
      result["size_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
      result["checkpoint"] = str(out)
    except Exception as exc:
      result["save_error"] = f"{type(exc).__name__}: {exc}"
  except Exception as exc:  # every failure is a result: the suite reports why the peer failed
    result["error"] = f"{step}: {type(exc).__name__}: {exc}"
    result["traceback"] = traceback.format_exc()[-4000:]
  Path(out_path).write_text(json.dumps(result, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
