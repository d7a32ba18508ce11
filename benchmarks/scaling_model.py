"""A model of step time and whole-run time at D = 1 ... 128 GPUs for incremental, ER and
from-scratch training, from one device's compute time and stated link bandwidths.

    python benchmarks/scaling_model.py [--images_per_s 2500] [--p1 1.0] [--overlap 0 1] \\
        [--batch_norm per_device]

Defaults describe the paper's run (ResNet-50 on ImageNet-1k in 4 tasks of 30 epochs, b = 56,
r = 7 per GPU) on the paper's ThetaGPU: DGX A100 nodes of 8 GPUs joined by NVLink through
NVSwitch, one HDR InfiniBand adapter per GPU. Every default is an assumption, not a cljax
measurement; replace `--images_per_s` and `--p1` with what `overhead.py` measures on the GPU.

Per step and per device:
- compute: rows / `images_per_s` (linear in the rows), b rows for incremental and from
  scratch, b + r for ER, times P1 (the buffer's own cost, A/B of overhead.py) for ER;
- gradient all-reduce of `params` fp32 gradients, hierarchical: reduce-scatter and
  all-gather inside a node over NVLink, a ring across nodes over InfiniBand on 1/g of the
  gradients per GPU; `overlap` of it hides behind the backward pass (2/3 of compute);
- BatchNorm (cljax's `model.batch_norm`; the paper's configs: `per_device`, as the authors'
  scripts): `global` sums its statistics over all devices,
  two small all-reduces per BatchNorm layer, latency-bound (a tree: 2 log2 D hops), on the
  critical path; `per_device` has none, and the running statistics (`batchnorm_statistics`
  fp32 numbers) ride on the gradient all-reduce;
- ER's buffer exchange: r records per device, (D - g)/D of them from other nodes, in one
  collective; it does not depend on the gradients, so `overlap` of it hides too.

A run: T tasks of N/T images, E epochs per task; incremental and ER take E N/T / (b D) steps
per task, from scratch t times as many at task t (it trains on every task so far).
Prints one JSON line per (D, overlap).
"""

import argparse
import json
import math

IMAGENET_TRAIN_IMAGES = 1_281_167
RESNET50_PARAMS = 25_557_032
RESNET50_BATCHNORM_LAYERS = 53
RESNET50_BATCHNORM_STATISTICS = 53_120


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--devices", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    add("--images_per_s", type=float, default=2500.0, help="one device, training")
    add("--p1", type=float, default=1.0, help="ER step / incremental step at b + r")
    add("--overlap", type=float, nargs="+", default=[0.0, 1.0])
    add("--batch_size", type=int, default=56)
    add("--num_representatives", type=int, default=7)
    add("--record_bytes", type=int, default=224 * 224 * 3 + 8)
    add("--params", type=int, default=RESNET50_PARAMS)
    add("--batchnorm_layers", type=int, default=RESNET50_BATCHNORM_LAYERS)
    add("--batchnorm_statistics", type=int, default=RESNET50_BATCHNORM_STATISTICS)
    add("--batch_norm", choices=["global", "per_device"], default="per_device")
    add("--gpus_per_node", type=int, default=8)
    add("--nvlink_gb_s", type=float, default=230.0, help="per GPU and direction, achieved")
    add("--ib_gb_s", type=float, default=23.0, help="per GPU and direction, achieved")
    add("--nvlink_latency_us", type=float, default=3.0)
    add("--ib_latency_us", type=float, default=6.0)
    add("--images", type=int, default=IMAGENET_TRAIN_IMAGES)
    add("--tasks", type=int, default=4)
    add("--epochs", type=int, default=30)
    return parser.parse_args()


def allreduce_s(size_bytes: float, devices: int, args) -> float:
    """Hierarchical ring all-reduce: inside the node over NVLink, across nodes over IB."""
    local = min(devices, args.gpus_per_node)
    nodes = math.ceil(devices / args.gpus_per_node)
    inside = (
        2
        * (local - 1)
        * (size_bytes / local / (args.nvlink_gb_s * 1e9) + args.nvlink_latency_us * 1e-6)
    )
    across = (
        2
        * (nodes - 1)
        * (size_bytes / local / nodes / (args.ib_gb_s * 1e9) + args.ib_latency_us * 1e-6)
    )
    return inside + across


def batchnorm_s(devices: int, args) -> float:
    """Global BatchNorm: two latency-bound all-reduces per layer, as a tree of 2 log2 D hops."""
    if devices == 1 or args.batch_norm == "per_device":
        return 0.0
    latency = args.ib_latency_us if devices > args.gpus_per_node else args.nvlink_latency_us
    return 2 * args.batchnorm_layers * 2 * math.ceil(math.log2(devices)) * latency * 1e-6


def exchange_s(devices: int, args) -> float:
    """r records into every device, from other nodes over IB and from the node over NVLink."""
    if devices == 1:
        return 0.0
    local = min(devices, args.gpus_per_node)
    received = args.num_representatives * args.record_bytes
    remote = received * (devices - local) / devices / (args.ib_gb_s * 1e9)
    inside = received * (local - 1) / devices / (args.nvlink_gb_s * 1e9)
    latency = args.ib_latency_us if devices > local else args.nvlink_latency_us
    return remote + inside + latency * 1e-6


def step_s(rows: int, devices: int, overlap: float, args, buffer: bool) -> float:
    """One step: compute, the critical-path BatchNorm all-reduces, and the part of the
    gradient all-reduce (and buffer exchange) that does not hide behind the backward pass."""
    compute = rows / args.images_per_s * (args.p1 if buffer else 1.0)
    hideable = allreduce_s(gradient_bytes(args), devices, args)
    if buffer:
        hideable += exchange_s(devices, args)
    exposed = max(hideable - overlap * compute * 2 / 3, hideable * (1 - overlap))
    return compute + batchnorm_s(devices, args) + exposed


def gradient_bytes(args) -> int:
    """What the gradient all-reduce carries: fp32 gradients, and with per-device BatchNorm
    the running statistics it averages."""
    statistics = args.batchnorm_statistics if args.batch_norm == "per_device" else 0
    return 4 * (args.params + statistics)


def run_minutes(step: float, devices: int, args, from_scratch: bool) -> float:
    """Whole-run training time (no evaluation, no data waits) at `step` seconds per step."""
    steps_per_task = args.epochs * args.images / args.tasks / (args.batch_size * devices)
    task_multiples = range(1, args.tasks + 1) if from_scratch else [1] * args.tasks
    return sum(steps_per_task * multiple * step for multiple in task_multiples) / 60


def model(devices: int, overlap: float, args) -> dict:
    b, r = args.batch_size, args.num_representatives
    incremental = step_s(b, devices, overlap, args, buffer=False)
    er = step_s(b + r, devices, overlap, args, buffer=True)
    minutes = {
        "incremental": run_minutes(incremental, devices, args, from_scratch=False),
        "er": run_minutes(er, devices, args, from_scratch=False),
        "from_scratch": run_minutes(incremental, devices, args, from_scratch=True),
    }
    single_device = args.batch_size / args.images_per_s
    return {
        "devices": devices,
        "overlap": overlap,
        "incremental_step_ms": round(1e3 * incremental, 2),
        "er_step_ms": round(1e3 * er, 2),
        "batch_norm": args.batch_norm,
        "gradient_allreduce_ms": round(1e3 * allreduce_s(gradient_bytes(args), devices, args), 3),
        "batchnorm_allreduces_ms": round(1e3 * batchnorm_s(devices, args), 3),
        "buffer_exchange_ms": round(1e3 * exchange_s(devices, args), 3),
        "incremental_scaling_efficiency": round(single_device / incremental, 3),
        **{f"{name}_minutes": round(value, 1) for name, value in minutes.items()},
        "er_over_incremental": round(minutes["er"] / minutes["incremental"], 3),
        "from_scratch_over_incremental": round(minutes["from_scratch"] / minutes["incremental"], 3),
    }


def main() -> None:
    args = parse_args()
    for overlap in args.overlap:
        for devices in args.devices:
            print(json.dumps(model(devices, overlap, args)))


if __name__ == "__main__":
    main()
