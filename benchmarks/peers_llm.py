"""peers_llm: llama-tiny int4 by jaxshrink, llm-compressor and AutoRound, side by side.

The zoo's `llama-tiny` is exported with `jaxshrink.interop.hf.export_hf` as a Hugging Face
Llama directory (config.json + model.safetensors) and quantized by the peers, each in its own
virtual environment under `.venv-peers-llm/<peer>/`, built by this suite on first use (`pip
install` of the pinned release plus the main venv's torch build, so no CUDA wheels are pulled)
and run as a subprocess (`benchmarks/peers_llm_worker.py`): the main process never imports
them, and the peers' pins do not collide (llm-compressor 0.14.0.1 requires auto-round <= 0.15.1
and transformers <= 5.17; AutoRound 0.16.1 takes transformers 5.25).

Everything is like for like with `examples/recipes/llama-tiny-gptq-int4.yaml`:

- weights: every projection and the output head, int4, asymmetric, groups of 128 input
  channels (llama-tiny's K = 320 and 1056 do not divide: the last group is short); the
  embedding table and the RMSNorm scales stay float. The peers' own defaults keep `lm_head`
  float; here theirs is quantized too, so every row stores the same layers. llm-compressor
  cannot group 128 over K = 320 (its observer reshapes into whole groups), so every tool also
  runs groups of 32, which divide both K.
- calibration: the 128 windows of 128 tokens our `quantize` stage reads (its
  `calibration_batches` 8 x the model's batch size 16: the first 128 rows of corpus-bpe's train
  split), handed to the peers as token ids (a stand-in tokenizer only satisfies their APIs).
- GPTQ settings: damping 0.01 of the mean Hessian diagonal, act-order with static groups,
  block-by-block calibration on the outputs of the blocks already quantized (ours and
  llm-compressor's sequential pipeline alike). AutoRound runs its default SignRound (200
  steps per decoder block, batches of 8); it rounds `lm_head` to nearest.
- perplexity: `exp` of the mean token NLL over every window of the test split, each window
  scored against its next-token targets (`jaxshrink.models.evaluate`); the worker computes it in
  PyTorch, and its float model's perplexity must match ours within 1e-3 relative (the summary
  flags a peer that misses). int4 moves this model's perplexity by hundredths of a percent, so
  rows also hold the mean per-token KL(float || quantized) and top-1 agreement with float.

Seconds are one-shot wall clocks of the quantization alone (model load, export and scoring
excluded) by different tools in different processes, reported raw: no side-by-side baseline
exists for a one-shot run, so compare them as orders of magnitude.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jaxshrink.bench import Record

SUITE = "peers_llm"
DESCRIPTION = (
  "llama-tiny int4 weight-only (groups of 128 and 32): jaxshrink RTN / GPTQ / AWQ against "
  "llm-compressor GPTQ and AutoRound on the same Hugging Face export, calibration windows and "
  "held-out test windows; perplexity, KL to float and one-shot quantization seconds."
)
MODEL = "llama-tiny"
KERNELS = ".*(proj|lm_head)/kernel"
INT4 = {"weight_bits": 4, "symmetric": False}
OURS = (
  ("jaxshrink RTN", {**INT4}),
  ("jaxshrink GPTQ", {**INT4, "method": "gptq"}),
  ("jaxshrink AWQ", {**INT4, "method": "awq"}),
)
# 128 is the comparison asked for; llm-compressor cannot group 128 over llama-tiny's K = 320 and
# 1056, so 32, which divides both, is run by every tool as well.
GROUPS = (128, 32)
REPO = Path(__file__).resolve().parents[1]
VENVS = REPO / ".venv-peers-llm"
WORKER = Path(__file__).resolve().parent / "peers_llm_worker.py"
# Each peer's pinned release; torch is pinned to the main venv's build (CPU wheels).
PEERS = {
  "llm-compressor": ("llmcompressor==0.14.0.1",),
  "auto-round": ("auto-round==0.16.1",),
}
PEER_LABELS = {"llm-compressor": "llm-compressor GPTQ", "auto-round": "AutoRound"}
# Packages whose versions the install record keeps.
REPORTED = ("torch", "transformers", "llmcompressor", "compressed-tensors", "auto-round")
FLOAT_TOLERANCE = 1e-3
INSTALL_TIMEOUT = 3600
RUN_TIMEOUT = 3600


def _torch_requirement() -> str:
  """The main venv's torch build (e.g. `torch==2.13.0+cpu`): the peers' plain `torch` wheel from
  the registry is the CUDA build, gigabytes of NVIDIA libraries this CPU suite never uses."""
  try:
    return f"torch=={importlib.metadata.version('torch')}"
  except importlib.metadata.PackageNotFoundError:
    return "torch"


def _du(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def ensure_venv(peer: str) -> dict[str, Any]:
  """The peer's venv, created and installed on first use; returns its install record.

  The record (`install.json` in the venv) holds the requirements, the installed versions, the
  install seconds and the venv's bytes; a venv whose requirements differ is rebuilt. On a pip
  failure the record has `error` (the tail of pip's output) and no `python`.
  """
  venv = VENVS / peer
  requirements = [*PEERS[peer], _torch_requirement()]
  marker = venv / "install.json"
  if marker.exists():
    record = json.loads(marker.read_text())
    if record.get("requirements") == requirements and "error" not in record:
      return record
  shutil.rmtree(venv, ignore_errors=True)
  VENVS.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  record: dict[str, Any] = {"peer": peer, "requirements": requirements}
  try:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *requirements]
    done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
  except (subprocess.SubprocessError, OSError) as exc:
    record["error"] = f"{type(exc).__name__}: {exc}"
  else:
    if done.returncode:
      # The resolver's conflict report or the missing-wheel line is at the end.
      lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "is ignored" not in ln]
      record["error"] = "pip install failed: " + "\n".join(lines[-25:])
    else:
      record["python"] = str(python)
      record["versions"] = _versions(python)
  record["install_seconds"] = round(time.perf_counter() - start, 1)
  record["venv_bytes"] = _du(venv) if venv.exists() else 0
  marker.parent.mkdir(parents=True, exist_ok=True)
  marker.write_text(json.dumps(record, indent=1) + "\n")
  return record


def _versions(python: Path) -> dict[str, str]:
  script = (
    "import importlib.metadata as m, json\n"
    f"names = {list(REPORTED)!r}\n"
    "out = {}\n"
    "for n in names:\n"
    "  try: out[n] = m.version(n)\n"
    "  except m.PackageNotFoundError: pass\n"
    "print(json.dumps(out))\n"
  )
  done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
  return json.loads(done.stdout)


def _run_worker(install: dict, peer: str, group: int, hf: Path, data: Path, tmp: Path) -> dict:
  """The worker's JSON for one peer and group size, or `{"error": ...}` when it did not run."""
  if "error" in install:
    return {"error": f"not installed: {install['error']}"}
  out = tmp / f"{peer}-g{group}.json"
  # -P: the worker's folder (benchmarks/, whose profile.py shadows the standard library's
  # `profile` that torch imports) stays off sys.path.
  command = [install["python"], "-P", str(WORKER), peer, str(group), str(hf), str(data), str(out),
             str(tmp / "work")]  # fmt: skip
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
  log = tmp / f"{peer}-g{group}.log"
  print(f"peers_llm: {peer} g{group} (log: {log})", flush=True)
  try:
    with open(log, "w") as handle:
      done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                            timeout=RUN_TIMEOUT, check=False)  # fmt: skip
  except subprocess.TimeoutExpired:
    return {"error": f"the worker ran past {RUN_TIMEOUT} s"}
  if not out.exists():
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {"error": f"the worker exited {done.returncode} without a result: " + "\n".join(tail)}
  return json.loads(out.read_text())


def _jax_fidelity(model, params, tree, x: Any) -> dict[str, float]:
  """Mean per-token KL(float || quantized) in nats and top-1 agreement on the test windows, on
  the integer path our evaluation scores (the worker's `score` computes the same for peers)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxshrink.evaluation import serving_model

  served = serving_model(model).apply

  @jax.jit
  def stats(xb):  # per-window sums, so padded rows of the last batch can be dropped
    ref = jax.nn.log_softmax(model.apply(params, xb).astype(jnp.float32), -1)
    got = jax.nn.log_softmax(served(tree, xb).astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(ref) * (ref - got), axis=(1, 2))
    return kl, jnp.sum(jnp.argmax(ref, -1) == jnp.argmax(got, -1), axis=1)

  x = np.asarray(x)
  size, kl, agree = 32, 0.0, 0.0
  for start in range(0, len(x), size):
    batch = x[start : start + size]
    valid = len(batch)
    batch = np.concatenate([batch, np.zeros((size - valid, *x.shape[1:]), x.dtype)])
    k, a = stats(batch)  # one compiled shape
    kl += float(np.sum(np.asarray(k, np.float64)[:valid]))
    agree += float(np.sum(np.asarray(a)[:valid]))
  return {"kl": kl / x.size, "agreement": agree / x.size}


def _ours(model, params, dataset, group: int, label: str, options: dict) -> Record:
  from jaxshrink.recipes import parse_recipe, run_recipe

  raw = {"model": MODEL, "stages": [{"quantize": {"target": KERNELS, **options,
         "group_size": group}}], "export": {"serving": None}}  # fmt: skip
  start = time.perf_counter()
  out = run_recipe(parse_recipe(raw), progress=False)
  total = time.perf_counter() - start
  stage_seconds = sum(entry["seconds"] for entry in out.pipeline.log)
  value, reference = out.metrics["value"], out.metrics["reference_value"]
  fidelity = _jax_fidelity(model, params, out.pipeline.tree, dataset.x_test)
  return Record(
    suite=SUITE, model=MODEL, method=f"{label} g{group}", metric="perplexity", value=value,
    reference_value=reference, size_bytes=out.report.total_bytes,
    float32_bytes=out.report.float32_bytes, seconds=round(stage_seconds, 1),
    extra={"tool": "jaxshrink", "group_size": group,
           **_fidelity_extra(value, reference, **fidelity),
           "seconds_with_evaluation": round(total, 1)},
  )  # fmt: skip


def _fidelity_extra(value: float, reference: float, kl: float, agreement: float) -> dict:
  # Scaled so the 3 decimals of BENCHMARKS.md's notes column resolve them.
  return {"change_vs_float_percent": 100 * (value / reference - 1),
          "kl_millinats": 1000 * kl, "top1_agreement": agreement}  # fmt: skip


def _jax_scored(checkpoint: str | None, dataset) -> dict:
  """The peer's saved checkpoint loaded by `jaxshrink.interop.hf.from_hf` and scored by our
  evaluation: the same number as the worker's means the in-memory model the worker scored is
  the checkpoint the peer writes, and that we read it right."""
  if checkpoint is None:
    return {}
  from jaxshrink.evaluation import evaluate_tree
  from jaxshrink.interop.hf import from_hf

  try:
    model = from_hf(checkpoint)
    return {"jaxshrink_scored_perplexity": evaluate_tree(model, model.weights(), dataset)}
  except Exception as exc:  # a reader gap is a finding of the run, not a crash of the suite
    return {"jaxshrink_scored_error": f"{type(exc).__name__}: {exc}"}


def _peer_record(peer: str, group: int, result: dict, install: dict, reference: float,
                 float32_bytes: int, scored: dict) -> Record:  # fmt: skip
  value = result.get("perplexity")
  torch_float = result.get("float_perplexity")
  versions = install.get("versions", {})
  extra: dict[str, Any] = {"tool": peer, "group_size": group}
  if value is not None:
    extra.update(_fidelity_extra(value, reference, result["kl"], result["top1_agreement"]))
  if torch_float is not None:
    relative = torch_float / reference - 1
    extra.update(torch_float_perplexity=torch_float, float_check_relative=relative,
                 float_check_ok=abs(relative) <= FLOAT_TOLERANCE)  # fmt: skip
  extra.update(scored)
  extra.update(
    versions=", ".join(f"{k} {v}" for k, v in versions.items()),
    install_seconds=install.get("install_seconds"),
    venv_mib=round(install.get("venv_bytes", 0) / 2**20),
  )  # fmt: skip
  for key in ("error", "save_error"):
    if key in result:
      extra[key] = result[key]
  seconds = result.get("seconds")
  return Record(
    suite=SUITE, model=MODEL, method=f"{PEER_LABELS[peer]} g{group}", metric="perplexity",
    value=value, reference_value=reference, size_bytes=result.get("size_bytes"),
    float32_bytes=float32_bytes, seconds=None if seconds is None else round(seconds, 1),
    extra=extra,
  )  # fmt: skip


def run() -> list[Record]:
  import jax
  import numpy as np

  from jaxshrink import models
  from jaxshrink.data import get_dataset
  from jaxshrink.interop.hf import export_hf
  from jaxshrink.quant.stage import OPTIONS

  model = models.get_model(MODEL)
  params = models.pretrained(model, progress=False)
  dataset = get_dataset(model.data)
  reference = float(models.evaluate(model, params, dataset))
  float32_bytes = int(sum(a.nbytes for a in jax.tree.leaves(params)))
  # What our `quantize` stage calibrates on: `calibration_batches` batches of the model's batch
  # size, consecutive rows of the train split from the first (`pipeline.calibration_inputs`).
  calibration = np.asarray(dataset.x_train)[: OPTIONS["calibration_batches"] * model.batch_size]
  records = [Record(
    suite=SUITE, model=MODEL, method="float32", metric="perplexity", value=reference,
    reference_value=reference, size_bytes=float32_bytes, float32_bytes=float32_bytes,
    seconds=None, extra={"tool": "jaxshrink", "calibration_windows": int(len(calibration)),
                         "test_windows": int(len(dataset.x_test))},
  )]  # fmt: skip
  for group in GROUPS:
    for label, options in OURS:
      records.append(_ours(model, params, dataset, group, label, options))
  with tempfile.TemporaryDirectory(prefix="peers_llm-") as name:
    tmp = Path(name)
    hf = export_hf(params, model, tmp / "llama-tiny-hf")
    data = tmp / "data.npz"
    np.savez(data, calibration=calibration, x_test=np.asarray(dataset.x_test),
             y_test=np.asarray(dataset.y_test))  # fmt: skip
    for peer in PEERS:
      install = ensure_venv(peer)
      for group in GROUPS:
        result = _run_worker(install, peer, group, hf, data, tmp)
        # llm-compressor writes compressed-tensors, which our Hugging Face reader loads.
        checkpoint = result.get("checkpoint") if peer == "llm-compressor" else None
        scored = _jax_scored(checkpoint, dataset)
        records.append(_peer_record(peer, group, result, install, reference, float32_bytes, scored))
  return records


def _fmt_bytes(n: int | None) -> str:
  return "-" if not n else f"{n / 2**20:.1f} MiB"


def summarize(records: list[Record]) -> str:
  by_method = {r.method: r for r in records}
  reference = records[0].reference_value
  lines = [
    f"Float32 perplexity {reference:.4f} on {records[0].extra['test_windows']} test windows of "
    f"128 tokens; every method calibrates on the same {records[0].extra['calibration_windows']} "
    "train windows. int4 moves this model's perplexity by hundredths of a percent, so each row "
    "also gives the mean per-token KL to float (nats) and top-1 agreement with float.",
    "",
  ]
  for r in records[1:]:
    e = r.extra
    if r.value is None:
      lines.append(f"- {r.method}: did not run: {e.get('error', 'unknown')}".replace("\n", " "))
      continue
    text = (f"- {r.method}: perplexity {r.value:.4f} ({e['change_vs_float_percent']:+.4f}% vs "
            f"float), KL {e['kl_millinats'] / 1000:.2e} nats, top-1 agreement "
            f"{100 * e['top1_agreement']:.2f}%, quantization {r.seconds:.1f} s, "
            f"{_fmt_bytes(r.size_bytes)}")  # fmt: skip
    if "float_check_relative" in e:
      ok = "ok" if e["float_check_ok"] else f"OVER the {FLOAT_TOLERANCE:g} tolerance"
      text += (f"; its torch float perplexity {e['torch_float_perplexity']:.4f} "
               f"({e['float_check_relative']:+.1e} relative to ours, {ok})")  # fmt: skip
    if "jaxshrink_scored_perplexity" in e:
      text += (f"; its saved checkpoint read by jaxshrink scores "
               f"{e['jaxshrink_scored_perplexity']:.4f}")  # fmt: skip
    if "jaxshrink_scored_error" in e:
      text += f"; jaxshrink could not read its checkpoint ({e['jaxshrink_scored_error']})"
    if "save_error" in e:
      text += f"; saving failed ({e['save_error']})"
    lines.append(text + ".")
  peers = [r for r in records if r.extra.get("tool") in PEERS and r.extra.get("versions")]
  installs = {r.extra["tool"]: r.extra for r in peers}
  if installs:
    lines += ["", "Peers, each in its own venv under .venv-peers-llm/ (pinned torch CPU build):"]
    for peer, e in installs.items():
      lines.append(f"- {peer}: {e['versions']}; installed in {e['install_seconds']} s, "
                   f"{e['venv_mib']} MiB on disk.")  # fmt: skip
  for group in GROUPS:
    rows = [r for r in records[1:] if r.extra["group_size"] == group and r.value is not None]
    if rows:
      ranked = sorted(rows, key=lambda r: r.value)
      ranking = " <= ".join(f"{r.method} {r.value:.4f}" for r in ranked)
      lines.append(f"\ng{group}, by perplexity: {ranking}.")
    ours = by_method.get(f"jaxshrink GPTQ g{group}")
    theirs = by_method.get(f"{PEER_LABELS['llm-compressor']} g{group}")
    if ours is None or ours.value is None or theirs is None:
      continue
    if theirs.value is None:
      lines.append(f"llm-compressor has no g{group} result to set our GPTQ against (above).")
    else:
      verdict = "at or below" if ours.value <= theirs.value else "ABOVE"
      lines.append(f"Our GPTQ g{group} perplexity {ours.value:.4f} is {verdict} "
                   f"llm-compressor's {theirs.value:.4f}.")  # fmt: skip
  lines.append(
    "\nSeconds are one-shot wall clocks of the quantization alone (our stage time includes "
    "JIT compilation; the peers' include their model wrapping and calibration passes), each "
    "tool in its own process on the same 2-core CPU, reported raw: a one-shot run has no "
    "side-by-side baseline to divide by, so read them as orders of magnitude."
  )
  return "\n".join(lines)


if __name__ == "__main__":
  # `python benchmarks/peers_llm.py` builds (or checks) the peers' venvs ahead of a run.
  for name in PEERS:
    print(json.dumps(ensure_venv(name), indent=1))
