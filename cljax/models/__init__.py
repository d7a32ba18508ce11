"""Models by name, each with its own documented arguments (`model.<name>.<argument>`).

Every model maps a float batch (B, *input_shape) to logits, as `model(x, train=..., mask=...)`:
`train` selects batch statistics over running averages in models with BatchNorm, and `mask`
marks the rows (new samples and representatives) those statistics are computed over.
"""

import flax.linen as nn
import ml_collections

from cljax import components
from cljax.models.cnn import SmallCNN
from cljax.models.mlp import MLP

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": SmallCNN}


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """Model `config.name` with its arguments `config[config.name]`."""
    cls = MODELS[config.name]
    return components.build("model", config.name, cls, config[config.name], num_classes=num_classes)
