"""`jaxshrink generate DIR --prompt TEXT`: text from a decoder checkpoint, timed against float.

The checkpoint's model must be a zoo language model whose dataset has a text tokenizer
(`llama-tiny`: the corpus BPE; `tiny-lm`: bytes). The compressed tree generates in a serving
mode (`integer` by default: weight-only kernels stream their codes at decode time, W8A8
kernels multiply int8 x int8), and the float model it was compressed from generates the same
number of tokens from the same prompt in the same run, interleaved, so the two speeds compare
(each time covers the whole call: the prompt's prefill and every decode step). `--prompt` given
several times generates for all of them in one batch, right-padded to the longest, each row
continuing its own prompt (`generate(prompt_lengths=...)`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from jaxshrink.errors import InvalidValueError, UsageError

ROUNDS = 3


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
  p = sub.add_parser(
    "generate", parents=[common], help="generate text from a decoder checkpoint, timed vs float"
  )
  p.add_argument("dir", help="checkpoint directory of a decoder (llama-tiny, tiny-lm)")
  p.add_argument(
    "--prompt", required=True, action="append",
    help="text to continue; repeat for a batch of prompts (of any lengths)",
  )  # fmt: skip
  p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (32)")
  p.add_argument("--max-len", type=int, help="KV-cache positions (default: prompt + new tokens)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
  p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
  p.add_argument("--kv-bits", type=int, choices=[8, 4], help="quantize the KV cache to 8 or 4 bits")
  p.add_argument(
    "--reference-model",
    help="zoo model or module:factory of the float model to time beside it, when it differs "
    "from the checkpoint's (default: the model the checkpoint's recipe started from)",
  )
  p.add_argument(
    "--serving",
    metavar="MODE",
    default="integer",
    help="serving mode of the compressed tree: integer, bfloat16, decode-once or factored "
    "(default: %(default)s)",
  )
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.set_defaults(func=cmd_generate)


def text_codec(model: Any) -> tuple[Any, Any, int | None]:
  """`(encode, decode, eos_id)` of a zoo language model's tokenizer, or a `UsageError`."""
  if model.data == "corpus-bpe":
    from jaxshrink.data import bpe_text

    return bpe_text.encode, bpe_text.decode, bpe_text.EOS_ID
  if model.data == "stdlib-text":
    from jaxshrink.data.text import tokenize_text

    def decode(ids):
      return bytes(int(i) for i in np.asarray(ids).reshape(-1)).decode("utf-8", "replace")

    return tokenize_text, decode, None
  raise UsageError(
    f"`jaxshrink generate` needs a text tokenizer, and model {model.name!r} reads "
    f"{model.data!r}, which has none. Generate from a llama-tiny or tiny-lm checkpoint."
  )


def cmd_generate(args) -> int:
  import jax

  from jaxshrink import export
  from jaxshrink.bench import interleaved_best
  from jaxshrink.generate import generate
  from jaxshrink.models.registry import manifest_model
  from jaxshrink.reference import float_reference
  from jaxshrink.serving import check_mode

  check_mode(args.serving, where="--serving")
  manifest = export.read_manifest(args.dir)
  if not manifest["model"]:
    raise UsageError(f"`{args.dir}` records no model; `jaxshrink generate` needs a zoo decoder.")
  model = manifest_model(manifest, args.dir)
  if model.metric != "perplexity":
    raise UsageError(
      f"`{args.dir}` holds {model.name!r}, a model scored by {model.metric!r}, not a language "
      "model; `jaxshrink generate` needs a decoder checkpoint (llama-tiny, tiny-lm)."
    )
  encode, decode, eos_id = text_codec(model)
  prompts = [np.asarray(encode(text), np.int32).reshape(-1) for text in args.prompt]
  for number, prompt in enumerate(prompts, start=1):
    if prompt.size == 0:
      raise UsageError(f"`--prompt` number {number} is empty; give some text to continue.")
  lengths = [len(prompt) for prompt in prompts]
  ids = np.zeros((len(prompts), max(lengths)), np.int32)  # right-padded; padding is never read
  for row, prompt in enumerate(prompts):
    ids[row, : len(prompt)] = prompt
  tree = export.load(args.dir)
  # The float model it was compressed from: a distilled student's teacher, say.
  reference_model, reference = float_reference(
    manifest, model, where=args.dir, reference_model=args.reference_model
  )
  options = {
    "temperature": args.temperature, "top_k": args.top_k, "key": jax.random.key(args.seed),
    "max_len": args.max_len, "kv_bits": args.kv_bits,
    "prompt_lengths": None if len(set(lengths)) == 1 else lengths,
  }  # fmt: skip

  def run_compressed():
    return generate(model, tree, ids, args.max_new_tokens, serving=args.serving, **options)

  def run_float():
    return generate(reference_model, reference, ids, args.max_new_tokens, **options)

  try:
    out = run_compressed()
    run_float()
  except InvalidValueError as e:  # sizes the user typed: a usage error, with its fix
    raise UsageError(str(e)) from None
  seconds = interleaved_best({"compressed": lambda: run_compressed().tokens,
                              "float": lambda: run_float().tokens}, rounds=ROUNDS)  # fmt: skip
  completions = []
  for row, text in enumerate(args.prompt):
    count = int(out.lengths[row])
    new = np.asarray(out.tokens[row, :count])
    new = new[new != eos_id] if eos_id is not None else new
    completions.append({"prompt": text, "text": decode(new), "new_tokens": count})
  count = sum(c["new_tokens"] for c in completions)  # every row's, for the batch's tokens/s
  payload = {
    "checkpoint": str(args.dir),
    "model": model.name,
    **completions[0],  # the first prompt's, as with one prompt
    "completions": completions,
    "serving_mode": args.serving,
    "kv_bits": args.kv_bits,
    "tokens_per_s": count / seconds["compressed"],
    "float_tokens_per_s": count / seconds["float"],
    "speedup_vs_float": seconds["float"] / seconds["compressed"],
  }
  if args.json:
    print(json.dumps(payload, indent=2))
    return 0
  for completion in completions:
    print(completion["prompt"] + completion["text"])
  print(
    f"{count} tokens at {payload['tokens_per_s']:.1f} tokens/s ({args.serving}"
    f"{'' if args.kv_bits is None else f', int{args.kv_bits} KV cache'}); the float model: "
    f"{payload['float_tokens_per_s']:.1f} tokens/s in the same run "
    f"({payload['speedup_vs_float']:.2f}x)"
  )
  return 0
