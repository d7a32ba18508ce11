"""The profile of training steps: its time accounting, and real traces."""

import json

import jax
import pytest

from benchmarks import overhead, stepbench
from cljax import profiling

HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={()->f32[]}

ENTRY %main (p: f32[8]) -> f32[] {
  %sort.1 = f32[8]{0} sort(%p), metadata={op_name="jit(step)/shard_map/buffer_insert/sort"}
  %all-to-all = (f32[2], f32[2]) all-to-all(%a, %b), metadata={op_name="jit(step)/buffer_sample/x"}
  %dot.2 = f32[8]{0} dot(%p, %p), metadata={op_name="jit(step)/jvp(Model)/dot_general"}
  %fusion.3 = f32[8]{0} fusion(%p), metadata={op_name="jit(step)/transpose(jvp(Model))/mul"}
  %all-reduce.4 = f32[8]{0} all-reduce(%p), metadata={op_name="jit(step)/shard_map/psum"}
  %add.5 = f32[] add(%p, %p)
  ROOT %add.6 = f32[] add(%p, %p), metadata={op_name="jit(step)/optax/add"}
}
"""


def _event(device: int, hlo_op: str, start: float, end: float, module: str = "jit_step"):
    args = {"hlo_module": module, "hlo_op": hlo_op, "device_ordinal": str(device)}
    return {"ph": "X", "pid": 1, "ts": start, "dur": end - start, "args": args}


def test_instructions_fall_in_the_category_of_their_scope():
    module, labelled = profiling.categories_by_instruction(HLO)
    assert module == "jit_step"
    assert {name: category for name, (category, _) in labelled.items()} == {
        "sort.1": "buffer_insert",
        "all-to-all": "buffer_sample",
        "dot.2": "forward",
        "fusion.3": "backward",
        "all-reduce.4": "all_reduce",
        "add.5": "unlabelled",
        "add.6": "other",
    }


def test_buffer_time_hidden_by_other_work_on_its_device_is_not_exposed():
    events = [
        # Device 0, in two steps: the insert overlaps the backward pass by 5 of its 10 us,
        # then runs alone for 10 us; the draw overlaps only the insert, not training work.
        _event(0, "sort.1", 0, 10),
        _event(0, "fusion.3", 5, 20),
        _event(0, "all-to-all", 8, 12),
        _event(0, "sort.1", 100, 110),
        # Device 1: the forward pass on another stream covers the whole exchange.
        _event(1, "dot.2", 0, 30),
        _event(1, "all-to-all", 10, 20),
        _event(1, "add.5", 40, 44),
        _event(1, "add.6", 44, 47),
        # Not this step's: another module, or an instruction the HLO text does not have.
        _event(0, "sort.1", 0, 1000, module="jit_other"),
        _event(1, "fusion.99", 50, 58),
    ]
    summary = profiling.summarize(events, HLO, steps=2)
    per_step = 1 / (2 * 2)
    assert summary["devices"] == 2
    categories = summary["categories"]
    assert categories["buffer_insert"] == {"busy_us": 20 * per_step, "exposed_us": 15 * per_step}
    assert categories["buffer_sample"] == {"busy_us": 14 * per_step, "exposed_us": 0.0}
    assert categories["forward"] == {"busy_us": 30 * per_step}
    assert categories["backward"] == {"busy_us": 15 * per_step}
    assert categories["unlabelled"] == {"busy_us": 4 * per_step}
    assert categories["other"] == {"busy_us": 3 * per_step}
    assert summary["unattributed_us"] == 8 * per_step
    assert [(op["hlo_op"], op["busy_us"], op["exposed_us"]) for op in summary["buffer_ops"]] == [
        ("sort.1", 20 * per_step, 15 * per_step),
        ("all-to-all", 14 * per_step, 0.0),
    ]


def test_a_profiled_er_step_has_every_buffer_instruction_attributed(tmp_path):
    """cljax's named scopes survive compilation: on a real XLA:CPU trace of the ER step,
    the insert, the draw and its exchange are found, and every traced instruction is
    attributed."""
    case = stepbench.Case(**overhead.CASES["mlp"], strategy="er")
    bench = stepbench.build(case)
    bench.compile()
    bench.run(1)
    profile = profiling.StepProfile(str(tmp_path), first=0, count=2)
    assert profile.starts_at(0)
    profile.start(0)
    bench.run(2)
    folder, summary = profile.finish(2, bench.compiled.as_text)
    assert json.loads((folder / profiling.SUMMARY_NAME).read_text()) == summary
    assert (folder / profiling.HLO_NAME).read_text() == bench.compiled.as_text()
    assert not profile.starts_at(0), "a run is profiled once"
    assert summary["steps"] == 2
    assert summary["devices"] == len(jax.devices())
    assert summary["unattributed_us"] == 0
    for category in ("buffer_insert", "buffer_sample", "forward", "backward", "all_reduce"):
        assert summary["categories"][category]["busy_us"] > 0, category
    sample_ops = [op for op in summary["buffer_ops"] if op["category"] == "buffer_sample"]
    assert any(op["hlo_op"].startswith("all-to-all") for op in sample_ops)


def test_a_directory_without_a_trace_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no .*trace.json.gz under {tmp_path}"):
        profiling.newest_trace(tmp_path)


def test_a_profile_ends_with_its_task_and_stops_the_profiler_if_a_step_fails(tmp_path):
    profile = profiling.StepProfile(str(tmp_path / "run"), first=3, count=5)
    assert not profile.starts_at(2)
    with pytest.raises(RuntimeError, match="a failed step"), profile:
        profile.start(3)
        assert not profile.ends_at(4, task_ends=False)
        assert profile.ends_at(4, task_ends=True)
        assert profile.ends_at(8, task_ends=False)
        raise RuntimeError("a failed step")
    assert not profile.active
    with jax.profiler.trace(str(tmp_path / "next")):
        pass
