"""The DER paper's Seq-MNIST protocol (Buzzega et al., NeurIPS 2020), on the real MNIST.

5 tasks of 2 classes (0-1, 2-3, ...), an MLP 784-100-100-10 (ReLU), plain SGD (no momentum,
no weight decay), batch 10, 1 epoch per task, no augmentation, inputs in [0, 1], one device.
The buffer (200, 500 or 5120 samples in all) is one reservoir over every sample of the
stream (`buffer.partition=stream`: all 10 rows of each batch are candidates); each step
replays the paper's minibatch from it. Learning rate, replay minibatch and the DER weights
are the paper's best (its appendix; Mammoth's `utils/best_args.py`). :ARG is
STRATEGY[-BUFFER], STRATEGY one of sgd (fine-tuning), joint (all tasks at once), lwf and
ewc_online (no buffer), er, der, derpp, agem, er_ace:

    python -m cljax.data.prepare mnist --from_dir=../shared/data/mnist   # once
    python -m cljax.train --config=mnist_der:er-200
    python -m cljax.train --config=mnist_der:derpp-500
    python -m cljax.train --config=mnist_der:sgd
    python -m cljax.train --config=mnist_der:joint
    python -m cljax.train --config=mnist_der:er_ace-500

Class-IL accuracy to expect, quoted from the DER paper's Table 2 (mean of 10 runs; buffers
200 / 500 / 5120): sgd 19.60, joint 95.57, LwF 19.62, oEWC 20.46, ER 80.43 / 86.12 / 93.40,
DER 84.55 / 90.54 / 94.90, DER++ 85.61 / 91.00 / 95.30, A-GEM 45.72 / 46.66 (200 / 500).
Measured by cljax (`python benchmarks/seq_mnist.py --from_dir=../shared/data/mnist`, seeds
0-4, 2-core CPU; docs/results.md has task-IL too): sgd 19.72, joint 95.48, LwF 20.02, oEWC
21.03, ER 78.86 / 85.98 / 93.15, DER 84.09 / 90.26 / 95.03, DER++ 84.82 / 91.04 / 94.73,
A-GEM 48.72 / 47.21 / 50.32; each run takes 2 to 10 s of training on that CPU. LwF uses the
paper's learning rate 0.03, alpha 1 and temperature 2; online EWC its learning rate 0.03,
lambda 90 and gamma 1; A-GEM its learning rate 0.1 and reference draw of 128.

ER-ACE (Caccia et al., ICLR 2022) is not in the DER paper, which has no figure for it on
Split MNIST; its cells use ER's hyperparameters at the same buffer, so that beside ER they
differ only in the asymmetric loss. Measured by cljax the same way: ER-ACE 82.75 / 89.44 /
93.69. GDumb (Prabhu et al., ECCV 2020) is not in the DER paper either: its cells fill the
buffer with its greedy class-balanced sampler and train a model from scratch on it before
each evaluation, 100 epochs with its paper's learning rate 0.05 and minibatch 16, decayed
along a cosine: 81.06 / 86.60 / 94.59. iCaRL uses the paper's learning rate 0.1 and replay
minibatch 10 (its buffer filled by herding at each task's end): 78.32 / 79.78 / 80.77 (paper
70.51 / 70.10).

As in the paper's code (Mammoth): the replay minibatch is drawn without replacement
(`buffer.draw`), DER++ draws its two replay terms' minibatches independently
(`strategy.derpp.draws=2`; cljax's default is one draw for both, half the replay work), and
the MLP starts from Xavier-uniform weights and zero biases (`model.mlp.weight_init`).
"""

import ml_collections
from cljax.configs import default

BUFFER_SIZES = (200, 500, 5120)
# (strategy, buffer) -> (learning rate, replay minibatch, alpha, beta), from the DER paper.
BEST = {
    ("er", 200): (0.01, 10, None, None),
    ("er", 500): (0.1, 10, None, None),
    ("er", 5120): (0.1, 10, None, None),
    ("der", 200): (0.03, 10, 0.2, None),
    ("der", 500): (0.03, 128, 1.0, None),
    ("der", 5120): (0.1, 128, 0.5, None),
    ("derpp", 200): (0.03, 128, 0.2, 1.0),
    ("derpp", 500): (0.03, 10, 1.0, 0.5),
    ("derpp", 5120): (0.1, 64, 0.2, 0.5),
}
BEST.update({("agem", size): (0.1, 128, None, None) for size in BUFFER_SIZES})
# ER-ACE, not in the paper, with ER's hyperparameters.
BEST.update({("er_ace", size): BEST[("er", size)] for size in BUFFER_SIZES})
# GDumb, not in the paper, with its own paper's learning rate and minibatch (SGD, 0.05, 16).
BEST.update({("gdumb", size): (0.05, 16, None, None) for size in BUFFER_SIZES})
BEST.update({("icarl", size): (0.1, 10, None, None) for size in BUFFER_SIZES})
GDUMB_EPOCHS = 100  # over the buffer, before each evaluation: about 3 s of a run on a CPU
# Strategies without a buffer: (strategy.name, scenario.name, learning rate).
WITHOUT_BUFFER = {
    "sgd": ("incremental", "class_incremental", 0.03),
    "joint": ("incremental", "joint", 0.03),
    "lwf": ("lwf", "class_incremental", 0.03),  # alpha 1, temperature 2: the defaults
    "ewc_online": ("ewc_online", "class_incremental", 0.03),  # lambda 90, gamma 1: defaults
}
BATCH_SIZE = 10


def get_config(arg: str = "er-200") -> ml_collections.ConfigDict:
    """`arg` is STRATEGY[-BUFFER]: sgd, joint, lwf, ewc_online, or er, der, derpp, agem,
    er_ace, gdumb, icarl with BUFFER 200, 500 or 5120 samples in all (default 200)."""
    strategy, _, size = arg.partition("-")
    if strategy in WITHOUT_BUFFER:
        name, scenario, learning_rate = WITHOUT_BUFFER[strategy]
        config = _protocol(default.get_config(name), learning_rate)
        config.scenario.name = scenario
        config.scenario.num_tasks = 1 if scenario == "joint" else 5
        return config
    size = int(size or BUFFER_SIZES[0])
    if (strategy, size) not in BEST:
        raise ValueError(
            f"mnist_der:{arg}: give sgd, joint, lwf, ewc_online or STRATEGY-BUFFER with STRATEGY"
            f" one of er, der, derpp, agem, er_ace, gdumb, icarl and BUFFER one of {BUFFER_SIZES}"
        )
    learning_rate, minibatch, alpha, beta = BEST[(strategy, size)]
    config = _protocol(default.get_config(strategy), learning_rate)
    config.buffer.partition = "stream"
    if strategy == "icarl":
        config.buffer.policy = "end_of_task"
    if strategy == "gdumb":
        config.buffer.policy = "class_balanced"
        default.set_hyperparameters(config, epochs=GDUMB_EPOCHS)
    config.buffer.draw = "without_replacement"
    config.buffer.size = size
    config.buffer.num_candidates = BATCH_SIZE
    config.buffer.num_representatives = minibatch
    default.set_hyperparameters(
        config, alpha=alpha, beta=beta, draws=2 if strategy == "derpp" else None
    )
    return config


def _protocol(config: ml_collections.ConfigDict, learning_rate: float) -> ml_collections.ConfigDict:
    """The settings every cell of the grid shares."""
    config.dataset.name = "mnist"
    config.dataset.augment = "none"
    config.scenario.num_tasks = 5
    config.model.name = "mlp"
    config.model.mlp.hidden_sizes = (100, 100)
    config.model.mlp.weight_init = "xavier_uniform"
    config.num_cpu_devices = 1
    config.batch_size = BATCH_SIZE
    config.eval_batch_size = 5_000  # a pass of 10,000 rows paid page faults: docs/performance.md
    config.checkpoint.every_steps = 0  # at every task's end only: a task trains in a second
    config.epochs_per_task = 1
    # K set, not chosen: no single steps to time it and no one-step program to trace (about
    # 0.3 s of a 4 s run); 128 trained as fast as 64 or 256 on a 2-core CPU; same results.
    config.steps_per_dispatch = 128
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.0
    config.optimizer.learning_rate = learning_rate
    return config
