"""Where a profiled train step spends its time, and how much of the buffer's work is exposed.

`StepProfile` traces a few training steps of a run (`logging.profile_from_step`); by hand:

    python -m cljax.profiling TRACE_DIR STEP_HLO [--steps 5]

TRACE_DIR is a `jax.profiler.trace` directory (the newest `*.trace.json.gz` under it is read);
STEP_HLO is the compiled step's HLO text (`jitted.lower(...).compile().as_text()`), which the
trainer and `benchmarks/overhead.py --profile` write next to their traces. Both XLA:CPU and
XLA:GPU tag each executed HLO instruction (a thunk on CPU, a kernel on GPU) with `hlo_op` and
`hlo_module`; the HLO text gives each instruction's `op_name`, the path of JAX named scopes it
came from. Each instruction falls in one category:

- `buffer_insert`, `buffer_sample`: under cljax's named scopes of the same names (the sample
  includes the exchange of representatives between devices);
- `backward` (under `transpose(jvp(...))`), `forward` (under `jvp(...)`);
- `all_reduce`: the gradients' (and the metrics') all-reduce;
- `other`: the rest (optimizer update, PRNG splitting, augmentation, bookkeeping);
- `unlabelled`: instructions the compiler left without an `op_name` (XLA:CPU's wrapped
  single-op kernels, such as a max-pool's reduce-window).

The summary (one JSON line by hand, `summary.json` beside a run's trace): per category,
`busy_us` is the time per step and device during which at least one of its instructions runs;
for the buffer's categories, `exposed_us` is the part of it during which no instruction
outside the buffer runs on the same device (on another stream or thread): the time the buffer
adds to the step if nothing else waits on it. `buffer_ops` lists the buffer's instructions by
time. Caveats: a fusion carries one op_name, so a fusion mixing scopes counts whole in one
category; a collective's time includes its wait for the slowest device; a loop and the
instructions of its body are both listed; kernels tagged with an instruction missing from
STEP_HLO are counted in `unattributed_us`. On a GPU, kernels that XLA runs as one command
buffer (a CUDA graph) are tagged with the command buffer, not their own instruction: profile
with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` to see each one (`benchmarks/gpu.sh
profile`).
"""

import argparse
import gzip
import json
import pathlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterable

import jax

BUFFER_CATEGORIES = ("buffer_insert", "buffer_sample")
TRAINING_CATEGORIES = ("forward", "backward", "all_reduce", "other", "unlabelled")
CATEGORIES = BUFFER_CATEGORIES + TRAINING_CATEGORIES
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][\w-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MODULE = re.compile(r"^HloModule (\S+?),")

HLO_NAME = "step.hlo.txt"
SUMMARY_NAME = "summary.json"

Interval = tuple[float, float]


class StepProfile:
    """Traces `count` training steps of a run from step `first` (steps of the run done
    before it) with `jax.profiler` into `directory`, where TensorBoard's profile plugin
    finds it, and writes beside the trace the compiled step's HLO text and its summary."""

    def __init__(self, directory: str, first: int | None, count: int):
        self.directory, self.first, self.count = directory, first, count
        self.traced_from: int | None = None
        self.active = False

    def starts_at(self, done: int) -> bool:
        """Whether tracing starts with the step after `done` steps of the run."""
        return done == self.first and self.traced_from is None

    def start(self, done: int) -> None:
        jax.profiler.start_trace(self.directory)
        self.traced_from, self.active = done, True

    def ends_at(self, done: int, task_ends: bool) -> bool:
        """Whether tracing ends after `done` steps of the run (or, if sooner, with the
        last step of the task)."""
        return self.active and (task_ends or done == self.traced_from + self.count)

    def finish(self, done: int, step_hlo: Callable[[], str]) -> tuple[pathlib.Path, dict]:
        """Ends the trace once `done` steps of the run have finished, and writes the HLO
        text (from `step_hlo`) and the summary of the traced steps beside it."""
        jax.profiler.stop_trace()
        self.active = False
        trace = newest_trace(pathlib.Path(self.directory))
        folder = trace.parent
        hlo_text = step_hlo()
        (folder / HLO_NAME).write_text(hlo_text)
        summary = summarize(read_trace_events(trace), hlo_text, done - self.traced_from)
        (folder / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
        return folder, summary

    def __enter__(self) -> "StepProfile":
        return self

    def __exit__(self, *exc_info) -> None:
        """Ends a trace that a failed step interrupted, leaving it unsummarised."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def categories_by_instruction(hlo_text: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """The HLO module's name, and each instruction's (category, op_name)."""
    module = _MODULE.search(hlo_text)
    if module is None:
        raise ValueError("the step's HLO text has no 'HloModule NAME,' line")
    labelled = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            name, opcode = match.groups()
            metadata = _OP_NAME.search(line)
            op_name = metadata.group(1) if metadata else ""
            labelled[name] = (_category(opcode, op_name), op_name)
    return module.group(1), labelled


def _category(opcode: str, op_name: str) -> str:
    scopes = op_name.split("/")
    for category in BUFFER_CATEGORIES:
        if category in scopes:
            return category
    if "transpose(jvp(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    if opcode.startswith("all-reduce"):
        return "all_reduce"
    return "other" if op_name else "unlabelled"


def newest_trace(trace_dir: pathlib.Path) -> pathlib.Path:
    """The newest `*.trace.json.gz` under `trace_dir` (`jax.profiler` writes each trace in
    a folder of its own, named by the time)."""
    traces = sorted(trace_dir.rglob("*.trace.json.gz"), key=lambda path: path.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    return traces[-1]


def read_trace_events(trace: pathlib.Path) -> list[dict]:
    """The complete events of a `*.trace.json.gz`."""
    with gzip.open(trace) as file:
        events = json.load(file)["traceEvents"]
    return [event for event in events if event.get("ph") == "X"]


def summarize(events: Iterable[dict], hlo_text: str, steps: int) -> dict:
    """Busy and exposed time per category, and per buffer instruction, per step and device."""
    module, labelled = categories_by_instruction(hlo_text)
    by_device: dict[str, list[tuple[str, Interval]]] = defaultdict(list)
    unattributed = 0.0
    for event in events:
        args = event.get("args", {})
        # XLA:GPU's profiler may name the module with its program id: jit_step(123).
        if args.get("hlo_module", "").split("(")[0] != module or "hlo_op" not in args:
            continue
        if args["hlo_op"] not in labelled:
            unattributed += event["dur"]
            continue
        device = str(args.get("device_ordinal", event["pid"]))
        by_device[device].append((args["hlo_op"], (event["ts"], event["ts"] + event["dur"])))
    busy = dict.fromkeys(CATEGORIES, 0.0)
    exposed = dict.fromkeys(BUFFER_CATEGORIES, 0.0)
    op_busy: dict[str, float] = defaultdict(float)
    op_exposed: dict[str, float] = defaultdict(float)
    for executed in by_device.values():
        spans = defaultdict(list)
        for name, span in executed:
            spans[labelled[name][0]].append(span)
        rest = union(span for category in TRAINING_CATEGORIES for span in spans[category])
        for category in CATEGORIES:
            merged = union(spans[category])
            busy[category] += length(merged)
            if category in BUFFER_CATEGORIES:
                exposed[category] += length(merged) - overlap(merged, rest)
        for name, (start, end) in executed:
            if labelled[name][0] in BUFFER_CATEGORIES:
                op_busy[name] += end - start
                op_exposed[name] += end - start - overlap([(start, end)], rest)
    per_step = 1 / (steps * max(len(by_device), 1))
    return {
        "steps": steps,
        "devices": len(by_device),
        "categories": {
            category: {
                "busy_us": round(busy[category] * per_step, 2),
                **(
                    {"exposed_us": round(exposed[category] * per_step, 2)}
                    if category in BUFFER_CATEGORIES
                    else {}
                ),
            }
            for category in CATEGORIES
        },
        "buffer_ops": [
            {
                "hlo_op": name,
                "category": labelled[name][0],
                "busy_us": round(total * per_step, 2),
                "exposed_us": round(op_exposed[name] * per_step, 2),
                "op_name": labelled[name][1],
            }
            for name, total in sorted(op_busy.items(), key=lambda item: -item[1])
        ],
        "unattributed_us": round(unattributed * per_step, 2),
    }


def union(spans: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same time as `spans`."""
    merged: list[Interval] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(merged: list[Interval]) -> float:
    return sum(end - start for start, end in merged)


def overlap(first: list[Interval], second: list[Interval]) -> float:
    """The time covered by both lists of sorted, disjoint intervals."""
    total, i, j = 0.0, 0, 0
    while i < len(first) and j < len(second):
        start = max(first[i][0], second[j][0])
        end = min(first[i][1], second[j][1])
        total += max(0.0, end - start)
        if first[i][1] < second[j][1]:
            i += 1
        else:
            j += 1
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", type=pathlib.Path)
    parser.add_argument("step_hlo", type=pathlib.Path)
    parser.add_argument("--steps", type=int, default=5, help="steps the trace holds")
    args = parser.parse_args()
    events = read_trace_events(newest_trace(args.trace_dir))
    print(json.dumps(summarize(events, args.step_hlo.read_text(), args.steps)))


if __name__ == "__main__":
    main()
