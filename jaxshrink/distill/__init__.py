"""Knowledge distillation: losses, a weighted objective, a jitted teacher-student step."""

from jaxshrink.distill.losses import attention_transfer_loss as attention_transfer_loss
from jaxshrink.distill.losses import cosine_embedding_loss as cosine_embedding_loss
from jaxshrink.distill.losses import feature_loss as feature_loss
from jaxshrink.distill.losses import hard_target_loss as hard_target_loss
from jaxshrink.distill.losses import init_projection as init_projection
from jaxshrink.distill.losses import kd_loss as kd_loss
from jaxshrink.distill.losses import logit_mse_loss as logit_mse_loss
from jaxshrink.distill.losses import masked_mean as masked_mean
from jaxshrink.distill.losses import soft_target_loss as soft_target_loss
from jaxshrink.distill.objective import DistillLoss as DistillLoss
from jaxshrink.distill.objective import FeaturePair as FeaturePair
from jaxshrink.distill.step import DistillState as DistillState
from jaxshrink.distill.step import DistillStep as DistillStep
from jaxshrink.distill.step import distill_step as distill_step
from jaxshrink.distill.step import functional as functional
from jaxshrink.distill.taps import tapped_apply as tapped_apply
from jaxshrink.distill.train import distill as distill
