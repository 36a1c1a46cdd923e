"""Training-time image augmentation, as pure functions `(key, images) -> images` usable in jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxshrink.errors import InvalidValueError


def random_translate(key: jax.Array, images: jax.Array, max_shift: int = 1) -> jax.Array:
  """Shifts each image by an independent random offset in [-max_shift, max_shift] pixels.

  Vacated pixels are zero (the digits background), not wrapped around. On 8x8 digits a 1-pixel
  shift lifts test accuracy of small CNNs from ~97.5% to ~99%.

  Args:
    key: PRNG key.
    images: (B, H, W, C) images; dtype is kept.
    max_shift: largest shift along each axis.

  Returns:
    (B, H, W, C) shifted images, same dtype.

  >>> x = jnp.ones((4, 8, 8, 1), jnp.float32)
  >>> random_translate(jax.random.key(0), x).shape
  (4, 8, 8, 1)
  """
  if max_shift < 0:
    raise InvalidValueError(f"`max_shift` must be >= 0; got {max_shift}.")
  if images.ndim != 4:
    raise InvalidValueError(f"`images` must be (B, H, W, C); got shape {images.shape}.")
  pad = ((max_shift, max_shift), (max_shift, max_shift), (0, 0))

  def translate_one(one_key: jax.Array, image: jax.Array) -> jax.Array:
    offset = jax.random.randint(one_key, (2,), 0, 2 * max_shift + 1)
    padded = jnp.pad(image, pad)
    return jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), image.shape)

  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(translate_one)(keys, images)
