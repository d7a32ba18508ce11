"""The paper's experiment with GhostNet 0.5 (timm's ghostnet_050): ImageNet-1k, 4 tasks.

The recipe of configs/imagenet_resnet50.py with the authors' GhostNet script: learning rate
0.01 x min(devices, 64), weight decay 1.5e-5, steps to 0.5, 0.05 and 0.01 of the peak at
epochs 15, 21 and 28 (the script's epochs, not ResNet's), dropout 0.225 before the
classifier.

    python -m cljax.train --config=imagenet_ghostnet[:incremental|:from_scratch]

Numbers to expect: the paper reports GhostNet's accuracy and runtime in its figures; they
are not quoted here, and cljax has not measured them (no ImageNet and no GPU cluster here).
"""

import ml_collections
from cljax.configs import imagenet_resnet50


def get_config(strategy: str = "er") -> ml_collections.ConfigDict:
    config = imagenet_resnet50.get_config(strategy)
    config.model.name = "ghostnet"
    config.model.ghostnet.width = 0.5
    config.model.ghostnet.dropout = 0.225
    config.optimizer.learning_rate = 0.01
    config.optimizer.weight_decay = 1.5e-5
    config.optimizer.decay_epochs = (15, 21, 28)
    return config
