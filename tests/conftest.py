"""Shared test setup: a persistent XLA compilation cache next to the zoo cache.

Compiling the zoo models' training and evaluation steps dominates the suite's time on
2 cores; with the cache, a second run (and every pytest-xdist worker after the first)
reuses the compiled executables.
"""

import jax

from jaxshrink.data import cache_dir

jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
