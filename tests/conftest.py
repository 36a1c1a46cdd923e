"""Shared test setup: a persistent XLA compilation cache next to the zoo cache.

Compiling the zoo models' training and evaluation steps dominates the suite's time on
2 cores; with the cache, a second run (and every pytest-xdist worker after the first)
reuses the compiled executables.
"""

import jax
import pytest

from jaxshrink.data import cache_dir

jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
