"""Offline datasets: scikit-learn digits, a byte-level corpus of stdlib docstrings, and the
minilm-sentences embedding set."""

from jaxshrink.data.augment import random_translate as random_translate
from jaxshrink.data.cache import atomic_write_bytes as atomic_write_bytes
from jaxshrink.data.cache import cache_dir as cache_dir
from jaxshrink.data.cache import commit_dir as commit_dir
from jaxshrink.data.cache import temporary_sibling_dir as temporary_sibling_dir
from jaxshrink.data.dataset import Dataset as Dataset
from jaxshrink.data.registry import get_dataset as get_dataset
from jaxshrink.data.registry import list_datasets as list_datasets
from jaxshrink.data.sources import import_factory as import_factory
from jaxshrink.data.sources import load_data_source as load_data_source
from jaxshrink.data.text import BYTE_VOCAB_SIZE as BYTE_VOCAB_SIZE
from jaxshrink.data.text import CONTEXT_LENGTH as CONTEXT_LENGTH
from jaxshrink.data.text import tokenize_text as tokenize_text
from jaxshrink.data.text import windows as windows
