"""The paper's experiment: ImageNet-1k in 4 class-incremental tasks of 250 classes, ResNet-50.

Bouvier et al., CCGrid 2024, with the recipe of the authors' experiment scripts: per-device
batch b = 56, c = 14 candidates and r = 7 representatives per step, a buffer of 30% of the
training set, 30 epochs per task with 5 warm-up epochs, SGD (momentum 0.9, weight decay 5e-5
on every parameter), learning rate 0.0125 x min(devices, 64), multiplied by 0.5, 0.05 and
0.01 at epochs 21, 26 and 28, schedule and optimizer state restarted at every task,
rehearsal from the second task on, the reference's `random_replace` buffer, BatchNorm
statistics per GPU (the scripts build timm's ResNet-50 with plain BatchNorm under Horovod,
with no SyncBatchNorm; this also saves 106 latency-bound all-reduces per step), bfloat16.

    python -m cljax.train --config=imagenet_resnet50          # ER (rehearsal)
    python -m cljax.train --config=imagenet_resnet50:incremental
    python -m cljax.train --config=imagenet_resnet50:from_scratch
    sbatch --nodes=16 launch/slurm.sbatch --config=imagenet_resnet50   # 64 GPUs, 4 per node

imagenet2012 must be prepared as array_record (python -m cljax.data.prepare imagenet2012),
or point dataset.name=imagefolder at the usual train/ and val/ folders.

Numbers to expect, quoted from the paper (not measured by cljax: no ImageNet and no GPU
cluster here): final top-5 accuracy about 80.5% with rehearsal against about 91% from
scratch, at a runtime close to incremental training's.
"""

import ml_collections
from cljax.configs import default

STRATEGIES = ("er", "incremental", "from_scratch")


def get_config(strategy: str = "er") -> ml_collections.ConfigDict:
    """The paper's run with `strategy` (the config's :ARG)."""
    config = default.get_config(strategy)
    config.dataset.name = "imagenet2012"
    config.dataset.image_size = 224
    config.dataset.augment = "inception"
    config.scenario.num_tasks = 4
    config.model.name = "resnet50"
    config.model.batch_norm = "per_device"
    config.buffer.rehearsal_ratio = 30.0
    config.buffer.num_candidates = 14
    config.buffer.num_representatives = 7
    config.buffer.policy = "random_replace"
    config.buffer.augment_from_task = 1
    config.batch_size = 56
    config.eval_batch_size = 1024
    config.epochs_per_task = 30
    config.dtype = "bfloat16"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.0125
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-5
    config.optimizer.decay_norm_and_bias = True
    config.optimizer.lr_scaling = "paper"
    config.optimizer.warmup_epochs = 5.0
    config.optimizer.schedule = "step"
    config.optimizer.decay_epochs = (21, 26, 28)
    config.optimizer.decay_factors = (0.5, 0.05, 0.01)
    config.optimizer.schedule_scope = "task"
    config.optimizer.reset_each_task = True
    return config
