"""Shared test setup: a persistent XLA compilation cache next to the zoo cache.

Compiling dominates the suite's time on 2 cores: thousands of small programs (a calibration
statistic, one layer's rounding), each taking tens of milliseconds to compile and about a
millisecond to load. Every program is cached, however fast it compiled, so each pytest-xdist
worker, notebook kernel and CLI subprocess after the first loads what another compiled, and a
second run compiles almost nothing. Subprocesses inherit the setting through the environment.
"""

import os

import jax
import pytest

from jaxshrink.data import cache_dir

XLA_CACHE = str(cache_dir() / "xla")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="session")
def tiny_lm_calibration():
  """`make(seed, windows)` -> (model, params, 256-window test subset, calibration batches of 32).

  Shared by the post-training quantization tests that measure tiny-lm perplexity.
  """
  import numpy as np

  from jaxshrink import data, models
  from jaxshrink.data.dataset import Dataset

  def make(seed: int, windows: int):
    model = models.get_model("tiny-lm")
    params = models.pretrained(model, progress=False)
    full = data.get_dataset(model.data)
    rng = np.random.default_rng(seed)
    calib = full.x_train[rng.choice(len(full.x_train), windows, replace=False)]
    test = rng.choice(len(full.x_test), 256, replace=False)
    subset = Dataset(
      "stdlib-text[subset]",
      full.kind,
      full.x_train[:1],
      full.y_train[:1],
      full.x_test[test],
      full.y_test[test],
      full.num_classes,
    )
    batches = [calib[i : i + 32] for i in range(0, len(calib), 32)]
    return model, params, subset, batches

  return make
