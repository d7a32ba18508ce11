"""The paper's experiment with ResNet-18: ImageNet-1k in 4 tasks of 250 classes.

The recipe of configs/imagenet_resnet50.py (b = 56, c = 14, r = 7, buffer 30%, 30 epochs per
task, SGD at 0.0125 x min(devices, 64) with 5 warm-up epochs and steps at 21, 26, 28),
with ResNet-18.

    python -m cljax.train --config=imagenet_resnet18[:incremental|:from_scratch]

Numbers to expect: the paper reports ResNet-18's accuracy and runtime in its figures; they
are not quoted here, and cljax has not measured them (no ImageNet and no GPU cluster here).
"""

import ml_collections
from cljax.configs import imagenet_resnet50


def get_config(strategy: str = "er") -> ml_collections.ConfigDict:
    config = imagenet_resnet50.get_config(strategy)
    config.model.name = "resnet18"
    return config
