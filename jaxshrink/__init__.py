"""jaxshrink: make trained JAX/Flax networks smaller and cheaper to run.

The names here are the curated top level; every subpackage (`jaxshrink.distill`,
`jaxshrink.quant`, `jaxshrink.sparsity`, ...) stays reachable under its own name, never
shadowed by a function: the distillation loop is `jaxshrink.distill.distill`.
"""

__version__ = "0.1.0"

from jaxshrink.cast import Cast as Cast
from jaxshrink.cast import cast_params as cast_params
from jaxshrink.distill import DistillLoss as DistillLoss
from jaxshrink.distill import distill_step as distill_step
from jaxshrink.encoding import Encoding as Encoding
from jaxshrink.encoding import materialize as materialize
from jaxshrink.encoding import register_encoding as register_encoding
from jaxshrink.errors import CheckpointError as CheckpointError
from jaxshrink.errors import JaxshrinkError as JaxshrinkError
from jaxshrink.errors import NoMatchError as NoMatchError
from jaxshrink.errors import UsageError as UsageError
from jaxshrink.export import export_safetensors as export_safetensors
from jaxshrink.export import import_safetensors as import_safetensors
from jaxshrink.export import load as load
from jaxshrink.export import read_manifest as read_manifest
from jaxshrink.export import save as save
from jaxshrink.lowrank import LowRank as LowRank
from jaxshrink.lowrank import factorize as factorize
from jaxshrink.lowrank import lowrank_apply as lowrank_apply
from jaxshrink.model import Compressed as Compressed
from jaxshrink.model import Linen as Linen
from jaxshrink.model import as_functional as as_functional
from jaxshrink.quant import LayerQuant as LayerQuant
from jaxshrink.quant import QArray as QArray
from jaxshrink.quant import QuantDotGeneral as QuantDotGeneral
from jaxshrink.quant import QuantRule as QuantRule
from jaxshrink.quant import QuantSpec as QuantSpec
from jaxshrink.quant import awq as awq
from jaxshrink.quant import from_qwix as from_qwix
from jaxshrink.quant import gptq as gptq
from jaxshrink.quant import ptq as ptq
from jaxshrink.quant import qat_apply as qat_apply
from jaxshrink.quant import quantize as quantize
from jaxshrink.quant import quantize_params as quantize_params
from jaxshrink.quant import quantized_apply as quantized_apply
from jaxshrink.report import tree_report as tree_report
from jaxshrink.serving import serve as serve
from jaxshrink.sparsity import BitmaskSparse as BitmaskSparse
from jaxshrink.sparsity import NMSparse as NMSparse
from jaxshrink.sparsity import Pruner as Pruner
from jaxshrink.sparsity import oneshot_prune as oneshot_prune
from jaxshrink.sparsity import pruned_masks as pruned_masks
from jaxshrink.sparsity import pruning as pruning
from jaxshrink.sparsity import shrink_params as shrink_params
from jaxshrink.sparsity import sparsegpt as sparsegpt
from jaxshrink.sparsity import wanda as wanda
from jaxshrink.tree import Rule as Rule
from jaxshrink.tree import flatten as flatten
from jaxshrink.tree import map_selected as map_selected
from jaxshrink.tree import select as select

__all__ = [
  "BitmaskSparse",
  "Cast",
  "CheckpointError",
  "Compressed",
  "DistillLoss",
  "Encoding",
  "JaxshrinkError",
  "LayerQuant",
  "Linen",
  "LowRank",
  "NMSparse",
  "NoMatchError",
  "Pruner",
  "QArray",
  "QuantDotGeneral",
  "QuantRule",
  "QuantSpec",
  "Rule",
  "UsageError",
  "as_functional",
  "awq",
  "cast_params",
  "distill_step",
  "export_safetensors",
  "factorize",
  "flatten",
  "from_qwix",
  "gptq",
  "import_safetensors",
  "load",
  "lowrank_apply",
  "map_selected",
  "materialize",
  "oneshot_prune",
  "pruned_masks",
  "pruning",
  "ptq",
  "qat_apply",
  "quantize",
  "quantize_params",
  "quantized_apply",
  "read_manifest",
  "register_encoding",
  "save",
  "select",
  "serve",
  "shrink_params",
  "sparsegpt",
  "tree_report",
  "wanda",
]
