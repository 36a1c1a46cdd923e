"""Quantization: specs, numerics, packed `QArray`, quantized dot products, PTQ, GPTQ, AWQ, QAT.

Per-layer settings are one first-match rule list (`QuantRule`, `from_qwix` for Qwix rules).

`gptq` and `awq` here are the functions (their modules stay importable by full path,
`from jaxshrink.quant.gptq import gptq_matrix`), as `wanda` and `sparsegpt` in `sparsity`.
"""

from jaxshrink.quant.aqt_interop import aqt_dot_general as aqt_dot_general
from jaxshrink.quant.aqt_interop import jaxshrink_equivalent as jaxshrink_equivalent
from jaxshrink.quant.awq import awq as awq
from jaxshrink.quant.calibrate import calibrate as calibrate
from jaxshrink.quant.dot_general import QuantConv as QuantConv
from jaxshrink.quant.dot_general import QuantDotGeneral as QuantDotGeneral
from jaxshrink.quant.dot_general import QuantEinsum as QuantEinsum
from jaxshrink.quant.dot_general import lsq_fake_quant as lsq_fake_quant
from jaxshrink.quant.gptq import gptq as gptq
from jaxshrink.quant.numerics import compute_qparams as compute_qparams
from jaxshrink.quant.numerics import dequantize_codes as dequantize_codes
from jaxshrink.quant.numerics import fake_quant as fake_quant
from jaxshrink.quant.numerics import quantize_codes as quantize_codes
from jaxshrink.quant.packing import pack_codes as pack_codes
from jaxshrink.quant.packing import unpack_codes as unpack_codes
from jaxshrink.quant.ptq import ptq as ptq
from jaxshrink.quant.ptq import quantize_params as quantize_params
from jaxshrink.quant.qarray import QArray as QArray
from jaxshrink.quant.qarray import quantize as quantize
from jaxshrink.quant.qarray import stack as stack
from jaxshrink.quant.qat import qat_apply as qat_apply
from jaxshrink.quant.rules import QuantRule as QuantRule
from jaxshrink.quant.rules import from_qwix as from_qwix
from jaxshrink.quant.serve import quantized_apply as quantized_apply
from jaxshrink.quant.spec import LayerQuant as LayerQuant
from jaxshrink.quant.spec import QuantSpec as QuantSpec
