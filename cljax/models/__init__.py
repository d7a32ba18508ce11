"""Models by name. Each takes a float batch (B, *input_shape) and returns logits."""

import flax.linen as nn
import ml_collections

from cljax.models.cnn import SmallCNN
from cljax.models.mlp import MLP

MODELS = {"mlp": MLP, "cnn": SmallCNN}


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """Builds `config.name` with the remaining fields of `config` as its arguments."""
    kwargs = {key: value for key, value in config.items() if key != "name"}
    return MODELS[config.name](num_classes=num_classes, **kwargs)
