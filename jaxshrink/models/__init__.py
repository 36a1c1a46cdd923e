"""The embedded model zoo: small Linen and NNX models, Llama decoders and the pretrained MiniLM-L6
encoder, pure `init`/`apply`, cached weights."""

from jaxshrink.models.base import ZooModel as ZooModel
from jaxshrink.models.base import linen_functions as linen_functions
from jaxshrink.models.base import nnx_functions as nnx_functions
from jaxshrink.models.pretrained import pretrained as pretrained
from jaxshrink.models.pretrained import pretrained_dir as pretrained_dir
from jaxshrink.models.registry import get_model as get_model
from jaxshrink.models.registry import list_models as list_models
from jaxshrink.models.registry import load_model as load_model
from jaxshrink.models.training import cosine_similarity as cosine_similarity
from jaxshrink.models.training import cross_entropy_loss as cross_entropy_loss
from jaxshrink.models.training import embedding_metrics as embedding_metrics
from jaxshrink.models.training import evaluate as evaluate
from jaxshrink.models.training import make_optimizer as make_optimizer
from jaxshrink.models.training import task_loss as task_loss
from jaxshrink.models.training import train as train
