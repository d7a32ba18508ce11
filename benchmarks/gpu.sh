#!/usr/bin/env bash
# The GPU measurements of the performance issue, in three calls of a lent GPU machine that has
# JAX, Flax and optax but no package index.
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh wheels   # here: cljax's other imports as
#       # Python 3.12 wheels in .whl/ (git-ignored, about 11 MB; carry it to the machine)
#   bash benchmarks/gpu.sh overhead [ARGS]   # there: 3 runs of overhead.py (ResNet-50 bf16,
#       # b = 56, r = 7, c = 14: P1, P2, images/s, peak memory)
#   bash benchmarks/gpu.sh profile [ARGS]   # there: a profile of ER steps and its summary (where
#       # each buffer op runs, how much of it nothing hides), with command buffers off so that
#       # every kernel is tagged with its own HLO instruction
#   bash benchmarks/gpu.sh step_and_input [ARGS]   # there: step_time.py for ResNet-50 and
#       # input_pipeline.py with 4, 8 and 16 workers
#
# ARGS go to overhead.py or step_time.py (a quick look on a CPU: `--cases mlp --rounds 2`).
# Results land in $OUT (the device tool's folder; /tmp/cljax-gpu elsewhere) as JSON lines,
# the machine's description, and the profile as one trace.tar.gz. Compiled steps are cached
# in /tmp/cljax-jax-cache, so the 2nd and 3rd overhead runs do not compile again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/cljax-gpu}
WHEELS=(
    array_record==0.8.6 dm-tree==0.1.10 docstring_parser==0.18.0 googleapis-common-protos==1.76.0
    grain==0.2.18 immutabledict==4.3.1 importlib_resources==7.1.0 ml_collections==1.1.0
    portpicker==1.6.0 simple-parsing==0.1.9 simplejpeg==1.9.0 tensorflow-datasets==4.9.10
    tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2
)
PURE_PYTHON_SOURCES=(promise==2.3) # published as a source archive only: built here
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

download_wheels() {
    mkdir -p .whl
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]/#/--platform=}" --dest .whl "${WHEELS[@]}"
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir .whl "${PURE_PYTHON_SOURCES[@]}"
}

prepare_machine() {
    if ! "$PYTHON" -c "import ml_collections, tensorflow_datasets, grain" 2>/dev/null; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/cljax-site .whl/*.whl
        export PYTHONPATH=/tmp/cljax-site
    fi
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
    export JAX_COMPILATION_CACHE_DIR=/tmp/cljax-jax-cache
    mkdir -p "$OUT"
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
        "$PYTHON" -c "import jax, flax, optax; print(jax.__version__, flax.__version__,
optax.__version__, jax.devices())"
        nproc
    } >"$OUT/machine.txt" 2>&1
}

case "${1:-}" in
wheels)
    download_wheels
    ;;
overhead)
    prepare_machine
    for _ in 1 2 3; do
        "$PYTHON" benchmarks/overhead.py --cases resnet50 "${@:2}" | tee -a "$OUT/overhead.jsonl"
    done
    ;;
profile)
    prepare_machine
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" "$PYTHON" benchmarks/overhead.py \
        --cases resnet50 --rounds 5 --replicas 1 --profile /tmp/cljax-trace "${@:2}" \
        | tee "$OUT/profile.jsonl"
    tar -czf "$OUT/trace.tar.gz" -C /tmp cljax-trace
    ;;
step_and_input)
    prepare_machine
    "$PYTHON" benchmarks/step_time.py --model resnet50 --image_size 224 --batch_size 56 \
        --dtype bfloat16 --strategies incremental er --steps 20 "${@:2}" \
        | tee "$OUT/step_time.jsonl"
    "$PYTHON" benchmarks/input_pipeline.py --workers 4 8 16 --images 4000 \
        | tee "$OUT/input_pipeline.jsonl"
    ;;
*)
    echo "usage: bash benchmarks/gpu.sh wheels | overhead|profile|step_and_input [ARGS]" >&2
    exit 2
    ;;
esac
