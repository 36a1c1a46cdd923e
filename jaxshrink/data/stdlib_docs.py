"""The docstrings of a fixed list of standard-library modules, as one ASCII text.

Standard library only, on purpose: `jaxshrink.data.text` runs this file in a fresh interpreter
without site-packages (`python -I -S stdlib_docs.py MODULE ...`) and reads the corpus from its
standard output, so no library loaded elsewhere can change what it sees.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings

# Sorted; chosen for long, varied docstrings (~1.2 MB together) and no import side effects
# (no GUI toolkits, no modules removed in recent Python versions). Changing it changes the corpus:
# bump STDLIB_TEXT_VERSION so stale caches are not reused.
STDLIB_TEXT_MODULES = (
  "_pydecimal", "_pyio", "argparse", "array", "ast", "asyncio.base_events", "asyncio.events",
  "asyncio.locks", "asyncio.streams", "asyncio.tasks", "asyncio.transports", "builtins",
  "calendar", "codecs", "collections", "collections.abc", "concurrent.futures._base",
  "configparser", "contextlib", "datetime", "difflib", "doctest", "email._policybase",
  "email.headerregistry", "email.message", "email.policy", "enum", "fractions", "ftplib",
  "functools", "gzip", "heapq", "http.client", "http.cookiejar", "http.server", "imaplib",
  "importlib.metadata", "inspect", "io", "ipaddress", "itertools", "json", "logging",
  "logging.handlers", "mailbox", "optparse", "os", "pathlib", "pickletools", "pkgutil",
  "platform", "pydoc", "random", "re", "selectors", "shutil", "smtplib", "socket", "socketserver",
  "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
  "traceback", "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request",
  "uuid", "weakref", "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils",
  "xmlrpc.client", "xmlrpc.server", "zipfile",
)  # fmt: skip


def _normalize_docstring(doc: str) -> str:
  """Tabs to spaces, no trailing blanks, at most one empty line in a row, ASCII only."""
  doc = doc.expandtabs(4).encode("ascii", errors="ignore").decode("ascii")
  lines = [line.rstrip() for line in doc.splitlines()]
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _member_docstrings(owner, module_name: str) -> list[str]:
  """Docstrings of the classes/functions defined in `owner` (a module or class), sorted by name."""
  docs = []
  for _, obj in sorted(vars(owner).items()):
    if isinstance(obj, (classmethod, staticmethod)):
      obj = obj.__func__
    if isinstance(obj, property):
      # inspect.getdoc on a property can fall back to the getter's class docstring.
      doc = obj.__doc__
    elif inspect.isclass(obj) or inspect.isroutine(obj):
      # Skip re-exported names so a docstring appears once, under its defining module.
      if inspect.ismodule(owner) and getattr(obj, "__module__", None) != module_name:
        continue
      doc = inspect.getdoc(obj)
    else:
      continue
    if doc:
      docs.append(doc)
    if inspect.isclass(obj) and inspect.ismodule(owner):
      docs.extend(_member_docstrings(obj, module_name))
  return docs


def build(modules: tuple[str, ...] = STDLIB_TEXT_MODULES) -> str:
  """Builds the corpus: module, class, method and function docstrings in a deterministic order.

  Modules that the interpreter lacks (minimal builds) are skipped.

  Args:
    modules: module names, visited in the given order.

  Returns:
    ASCII text, one docstring per paragraph block, separated by blank lines.
  """
  docs = []
  for module_name in modules:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices from importing old modules
        module = importlib.import_module(module_name)
    except ImportError:
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # touching deprecated aliases (typing.io) warns
      module_doc = inspect.getdoc(module)
      if module_doc:
        docs.append(module_doc)
      docs.extend(_member_docstrings(module, module_name))
  normalized = (_normalize_docstring(doc) for doc in docs)
  return "\n\n".join(doc for doc in normalized if doc) + "\n"


if __name__ == "__main__":
  sys.stdout.write(build(tuple(sys.argv[1:]) or STDLIB_TEXT_MODULES))
