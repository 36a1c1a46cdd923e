"""Recovery: distill the float model into a compressed one, keeping masks, grids and ranks."""

from jaxshrink.recover.train import RecoverResult as RecoverResult
from jaxshrink.recover.train import TrainableView as TrainableView
from jaxshrink.recover.train import decode as decode
from jaxshrink.recover.train import recover as recover
from jaxshrink.recover.train import reencode as reencode
from jaxshrink.recover.train import trainable_view as trainable_view
