"""Compact checkpoints (orbax + JSON manifest) and safetensors interop."""

from jaxshrink.export.checkpoint import disk_bytes as disk_bytes
from jaxshrink.export.checkpoint import load as load
from jaxshrink.export.checkpoint import save as save
from jaxshrink.export.manifest import ARRAYS as ARRAYS
from jaxshrink.export.manifest import FORMAT_VERSION as FORMAT_VERSION
from jaxshrink.export.manifest import MANIFEST as MANIFEST
from jaxshrink.export.manifest import check_matches as check_matches
from jaxshrink.export.manifest import read_manifest as read_manifest
from jaxshrink.export.overwrite import check_overwrite as check_overwrite
from jaxshrink.export.safetensors_io import export_safetensors as export_safetensors
from jaxshrink.export.safetensors_io import import_safetensors as import_safetensors
from jaxshrink.export.sharding import shard_like as shard_like
