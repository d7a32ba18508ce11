"""Class-incremental CIFAR-100: 10 tasks of 10 classes, ResNet-18 for 32x32 inputs.

The DER paper's Seq-CIFAR-10 protocol (configs/cifar10_der.py: 50 epochs per task, batch 32
and 32 replayed samples per step, plain SGD, random crop and flip) carried to CIFAR-100, at
0.03 with a buffer of 2,000 samples (20 per class).

    python -m cljax.train --config=cifar100_resnet18[:er|:derpp|:incremental|:from_scratch]

cifar100 must be prepared as array_record (python -m cljax.data.prepare cifar100).

Numbers to expect: none are quoted (no published run with exactly this protocol), and cljax
has not measured them (no CIFAR-100 download here).
"""

import ml_collections
from cljax.configs import cifar10_der


def get_config(strategy: str = "er") -> ml_collections.ConfigDict:
    config = cifar10_der.get_config(strategy)
    config.dataset.name = "cifar100"
    config.scenario.num_tasks = 10
    config.buffer.budget_per_class = 20
    config.optimizer.learning_rate = 0.03
    return config
