"""Hugging Face float checkpoints both ways, checked by transformers itself: a Llama export
gives transformers' logits within 1e-4 of ours, a re-import is exact, `model: hf:PATH` runs a
recipe, and bad directories are refused by name."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxshrink import export
from jaxshrink.cli import main
from jaxshrink.encoding import materialize
from jaxshrink.errors import CheckpointError, UsageError
from jaxshrink.interop.hf import export_hf, from_hf, hf_config, load_hf
from jaxshrink.models import get_model
from jaxshrink.models.base import zoo_model
from jaxshrink.models.llama import LlamaForCausalLM
from jaxshrink.models.llama_zoo import LLAMA_TINY, random_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def torch_logits(directory: Path, ids: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """llama-tiny's architecture with seeded random weights (training it takes minutes; the
  `peers_llm` benchmark checks the trained weights' perplexity in transformers)."""
  model = get_model("llama-tiny")
  params = random_weights(model, LLAMA_TINY, 0)
  out = export_hf(params, model, tmp_path_factory.mktemp("hf") / "llama-tiny")
  return model, params, out


def ids(vocab: int, shape=(2, 24)) -> np.ndarray:
  return np.random.default_rng(0).integers(0, vocab, shape).astype(np.int32)


def test_llama_tiny_export_matches_transformers_and_reimports_exactly(tiny):
  model, params, out = tiny
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
  assert config["jaxshrink"]["data"] == "corpus-bpe"
  tokens = ids(LLAMA_TINY.vocab_size)
  ours = np.asarray(jax.jit(model.apply)(params, tokens))
  assert np.abs(torch_logits(out, tokens) - ours).max() <= 1e-4
  again, back = load_hf(out)
  assert (again.data, again.metric, again.input_shape) == ("corpus-bpe", "perplexity", (128,))
  np.testing.assert_array_equal(np.asarray(jax.jit(again.apply)(back, tokens)), ours)


def test_qwen2_layout_with_biases_and_tied_head(tmp_path):
  config = dataclasses.replace(
    LLAMA_TINY, num_layers=2, attention_bias=True, tie_embeddings=True, rope_theta=1e6
  )
  model = zoo_model(
    "qwen-micro", functools.partial(LlamaForCausalLM, config), (16,), "int32", "",
    data="", metric="perplexity", train_steps=1, learning_rate=1e-3, batch_size=1,
  )  # fmt: skip
  params = random_weights(model, config, 1)
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x + 0.02 if "bias" in jax.tree_util.keystr(path) else x, params
  )
  out = export_hf(params, model, tmp_path / "qwen")
  assert hf_config(model)["architectures"] == ["Qwen2ForCausalLM"]
  tokens = ids(config.vocab_size)
  ours = np.asarray(jax.jit(model.apply)(params, tokens))
  assert np.abs(torch_logits(out, tokens) - ours).max() <= 1e-4
  _, back = load_hf(out)
  np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(back, tokens)), ours)


def test_a_transformers_checkpoint_imports(tmp_path):
  # The other direction: a directory `save_pretrained` wrote (bf16 weights, its own config keys).
  config = transformers.LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
  )  # fmt: skip
  torch.manual_seed(0)
  theirs = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
  theirs.save_pretrained(tmp_path / "saved")
  model, params = load_hf(tmp_path / "saved")
  tokens = ids(96, (1, 12))
  with torch.no_grad():
    expected = theirs.float()(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(np.asarray(jax.jit(model.apply)(params, tokens)) - expected).max() <= 1e-4
  assert model.data == "" and model.unset == ("train_steps", "learning_rate", "batch_size")


def test_recipe_on_an_hf_model_then_eval_and_export(tmp_path, capsys):
  # A one-layer decoder on llama-tiny's data (its vocabulary and windows): evaluation is quick.
  config = dataclasses.replace(LLAMA_TINY, hidden_size=64, intermediate_size=128, num_layers=1,
                               num_heads=4, num_kv_heads=2)  # fmt: skip
  model = zoo_model(
    "llama-micro", functools.partial(LlamaForCausalLM, config), (128,), "int32", "",
    data="corpus-bpe", metric="perplexity", train_steps=1, learning_rate=1e-3, batch_size=1,
  )  # fmt: skip
  out = export_hf(random_weights(model, config, 2), model, tmp_path / "micro-hf")
  recipe = tmp_path / "int8.yaml"
  recipe.write_text(
    f"model: hf:{out}\nstages:\n  - quantize: {{weight_bits: 8, target: '.*proj/kernel'}}\n"
    "export: {}\n"
  )
  checkpoint = tmp_path / "ckpt"
  assert main(["compress", str(recipe), "--out", str(checkpoint)]) == 0
  manifest = export.read_manifest(checkpoint)
  assert manifest["model"] == f"hf:{out}"
  capsys.readouterr()
  assert main(["eval", str(checkpoint), "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["metric"] == "perplexity"
  # The compressed checkpoint, exported as float, is what transformers then computes.
  exported = tmp_path / "int8-hf"
  assert main(["export", str(checkpoint), "--to", "hf", str(exported)]) == 0
  # The data's tokenizer goes along: transformers reads the model's own token ids from text.
  from jaxshrink.data import bpe_text

  text = "The quick brown fox jumps over the lazy dog."
  ids_there = transformers.AutoTokenizer.from_pretrained(exported)(text)["input_ids"]
  assert ids_there == bpe_text.encode(text).tolist()
  tokens = ids(LLAMA_TINY.vocab_size)
  ours = np.asarray(jax.jit(model.apply)(materialize(export.load(checkpoint)), tokens))
  assert np.abs(torch_logits(exported, tokens) - ours).max() <= 1e-4


def test_bad_directories_are_refused_by_name(tiny, tmp_path):
  _, _, out = tiny
  with pytest.raises(CheckpointError, match="config.json` does not exist"):
    load_hf(tmp_path)
  bad = tmp_path / "bad"
  bad.mkdir()
  config = json.loads((out / "config.json").read_text())
  for field, value, match in [
    ("model_type", "gpt2", "model_type 'gpt2' is not supported"),
    ("hidden_act", "gelu", "field `hidden_act` is 'gelu'"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5}, "rotary scaling"),
    ("num_hidden_layers", "six", "field `num_hidden_layers` is 'six'"),
  ]:
    (bad / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError, match=match):
      from_hf(bad)
  # Tensors that do not fit the config are named, and a damaged file is not loaded.
  (bad / "config.json").write_text(json.dumps({**config, "hidden_size": 256}))
  (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
  with pytest.raises(CheckpointError, match="has shape"):
    load_hf(bad)
  (bad / "config.json").write_text(json.dumps(config))
  (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:5000])
  with pytest.raises(CheckpointError, match="cannot read"):
    load_hf(bad)


def test_export_refuses_models_without_a_hugging_face_counterpart(tmp_path):
  model = get_model("digits-mlp")
  with pytest.raises(UsageError, match="not a Llama decoder or a BERT encoder"):
    export_hf(model.init(jax.random.key(0)), model, tmp_path / "x")
  assert not (tmp_path / "x").exists()
