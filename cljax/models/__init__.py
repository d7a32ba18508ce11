"""Models by name, each with its own documented arguments (`model.<name>.<argument>`).

`register(NAME)` adds a Flax module to the registry (from cljax or from the user's own
code, before the config is loaded); its fields declared with `components.argument` become
`model.<NAME>.*`.

Every model maps a float batch (B, *input_shape) to logits, as `model(x, train=..., mask=...)`:
`train` selects batch statistics over running averages in models with BatchNorm (and turns
dropout on), and `mask` marks the rows (new samples and representatives) those statistics
are computed over. cljax supplies the number of classes, and to models that take them the
computation dtype and the collectives BatchNorm sums its statistics with: every device's
(`batch_norm='global'`) or none (`'per_device'`, each device's own rows).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from cljax import components
from cljax.collectives import Collectives, SingleDevice
from cljax.models.cnn import SmallCNN
from cljax.models.ghostnet import GhostNet
from cljax.models.mlp import MLP
from cljax.models.resnet import ResNet18, ResNet18Cifar, ResNet50
from cljax.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model", "model.name")
register = MODELS.register
for _name, _module in (
    ("mlp", MLP),
    ("cnn", SmallCNN),
    ("resnet18", ResNet18),
    ("resnet50", ResNet50),
    ("resnet18_cifar", ResNet18Cifar),
    ("ghostnet", GhostNet),
):
    register(_name)(_module)
BATCH_NORM = ("global", "per_device")


def per_device_batch_norm(model: Mapping) -> bool:
    """Whether the models of a config's `model` section normalise by each device's own
    rows; the train step must then average their running statistics over devices
    (`StepConfig.average_model_state`)."""
    return model.get("batch_norm", "global") == "per_device"


def create_model(
    model: Mapping,
    num_classes: int,
    dtype: Any = None,
    collectives: Collectives = SingleDevice(),  # noqa: B008 (stateless)
) -> nn.Module:
    """The model a config's `model` section names, with its arguments; its BatchNorm sums
    statistics over `collectives` unless `model.batch_norm` is `per_device`."""
    if per_device_batch_norm(model):
        collectives = SingleDevice()
    name = model["name"]
    cls = MODELS[name]
    fields = {field.name for field in dataclasses.fields(cls)}
    supplied = {"dtype": dtype, "collectives": collectives}
    supplied = {
        key: value for key, value in supplied.items() if key in fields and value is not None
    }
    return components.build(
        "model", name, cls, model.get(name, {}), num_classes=num_classes, **supplied
    )
