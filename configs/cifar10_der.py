"""The DER paper's Seq-CIFAR-10 protocol (Buzzega et al., NeurIPS 2020), class-incremental.

5 tasks of 2 classes, ResNet-18 for 32x32 inputs, 50 epochs per task, batch 32 and 32
replayed samples per step, plain SGD at the paper's best rates, random crop (padding 4) and
flip, a buffer of 200 (or 500) samples. :ARG is STRATEGY[-BUFFER]:

    python -m cljax.train --config=cifar10_der:er --config.num_cpu_devices=1
    python -m cljax.train --config=cifar10_der:der
    python -m cljax.train --config=cifar10_der:derpp          # buffer 200 (the default)
    python -m cljax.train --config=cifar10_der:derpp-500

cifar10 must be prepared as array_record (python -m cljax.data.prepare cifar10).

Numbers to expect, quoted from the DER paper (class-IL accuracy, buffer 200; not measured
by cljax: no CIFAR-10 download here): ER 44.79, DER 61.93, DER++ 64.88. Differences from
the paper's code: cljax's buffer is class-balanced (20 slots per class for 200) where the
paper's reservoir is over the whole stream, and DER++ uses one draw of representatives for
both of its terms where the paper draws twice.
"""

import ml_collections
from cljax.configs import default

# The DER paper's best hyperparameters on Seq-CIFAR-10 (learning rate, alpha, beta).
BEST = {
    ("er", 200): (0.1, None, None),
    ("er", 500): (0.1, None, None),
    ("der", 200): (0.03, 0.3, None),
    ("der", 500): (0.03, 0.3, None),
    ("derpp", 200): (0.03, 0.1, 0.5),
    ("derpp", 500): (0.03, 0.2, 0.5),
}


def get_config(arg: str = "derpp-200") -> ml_collections.ConfigDict:
    """`arg` is STRATEGY[-BUFFER], BUFFER 200 or 500 samples in all."""
    strategy, _, buffer_size = arg.partition("-")
    buffer_size = int(buffer_size or 200)
    config = default.get_config(strategy)
    config.dataset.name = "cifar10"
    config.dataset.augment = "crop_flip"
    config.scenario.num_tasks = 5
    config.model.name = "resnet18_cifar"
    config.num_cpu_devices = 1
    config.batch_size = 32
    config.epochs_per_task = 50
    config.buffer.budget_per_class = buffer_size // 10
    config.buffer.num_candidates = 32
    config.buffer.num_representatives = 32
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.0
    learning_rate, alpha, beta = BEST.get((strategy, buffer_size), (0.1, None, None))
    config.optimizer.learning_rate = learning_rate
    default.set_hyperparameters(config, alpha=alpha, beta=beta)
    return config
