"""Low-rank factorization: truncated SVD of kernels, `LowRank` encoding, factored execution."""

from jaxshrink.lowrank.encoding import LowRank as LowRank
from jaxshrink.lowrank.encoding import quantize_factors as quantize_factors
from jaxshrink.lowrank.finetune import finetune as finetune
from jaxshrink.lowrank.layers import LowRankDense as LowRankDense
from jaxshrink.lowrank.layers import LowRankLinear as LowRankLinear
from jaxshrink.lowrank.layers import lowrank_apply as lowrank_apply
from jaxshrink.lowrank.svd import allocate_budget as allocate_budget
from jaxshrink.lowrank.svd import contract_dims_from_model as contract_dims_from_model
from jaxshrink.lowrank.svd import energy_rank as energy_rank
from jaxshrink.lowrank.svd import factorize as factorize
from jaxshrink.lowrank.svd import factorize_array as factorize_array
from jaxshrink.lowrank.svd import plan_ranks as plan_ranks
from jaxshrink.lowrank.svd import svd_factors as svd_factors
