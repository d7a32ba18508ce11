"""End-to-end training on digits with 8 devices: strategies order as the method predicts."""

import itertools
import json
import pathlib
import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from cljax import configuration, errors, metrics, plots, profiling, report, steps, trainer
from tests.helpers import REPO, tensorboard_scalars

pytestmark = pytest.mark.slow  # every test here trains or starts processes


def digits_config(data_dir: str, strategy: str):
    """The default experiment on 8 devices: per-device batch 2 keeps the global batch of 8."""
    config = configuration.load_config()
    config.num_cpu_devices = 8
    config.dataset.data_dir = data_dir
    config.strategy.name = strategy
    config.batch_size = 2
    config.buffer.budget_per_class = 3
    config.buffer.num_candidates = 2
    config.buffer.num_representatives = 2
    return config


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict:
    return {
        strategy: tmp_path_factory.mktemp(strategy)
        for strategy in ("incremental", "er", "derpp", "from_scratch")
    }


PROFILED = {"profile_from_step": 3, "profile_steps": 2}


@pytest.fixture(scope="module")
def results(data_dir, workdirs):
    configs = {strategy: digits_config(data_dir, strategy) for strategy in workdirs}
    configs["er"].logging.update(PROFILED)
    return {
        strategy: trainer.train_and_evaluate(configs[strategy], str(workdir))
        for strategy, workdir in workdirs.items()
    }


def test_strategies_order_from_scratch_over_er_over_incremental(results):
    accuracy = {name: run["final_average_accuracy"] for name, run in results.items()}
    assert accuracy["from_scratch"] > accuracy["er"]
    assert accuracy["er"] > accuracy["incremental"] + 0.3
    assert accuracy["incremental"] < 0.3
    assert results["er"]["average_forgetting"] < results["incremental"]["average_forgetting"]


def test_derpp_rehearses_as_well_as_er(results):
    accuracy = {name: run["final_average_accuracy"] for name, run in results.items()}
    assert accuracy["derpp"] > accuracy["incremental"] + 0.3
    assert accuracy["derpp"] > accuracy["er"] - 0.05


def test_incremental_forgets_earlier_tasks_almost_entirely(results):
    acc = np.asarray(results["incremental"]["accuracy_matrix"])
    assert (np.diag(acc) > 0.85).all()
    assert acc[-1, :-1].max() < 0.2


def test_written_metrics_equal_returned_metrics(results, workdirs):
    for name, run in results.items():
        written = json.loads((workdirs[name] / "metrics.json").read_text())
        assert written["accuracy_matrix"] == run["accuracy_matrix"]
        assert written["num_devices"] == 8


def test_a_profiled_run_leaves_a_trace_and_its_summary(results, workdirs):
    summaries = list((workdirs["er"] / "profile" / "process_0").rglob(profiling.SUMMARY_NAME))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["steps"] == PROFILED["profile_steps"]
    assert summary["categories"]["buffer_sample"]["busy_us"] > 0
    assert list(summaries[0].parent.glob("*.xplane.pb")), "TensorBoard's profile plugin reads it"
    assert (summaries[0].parent / profiling.HLO_NAME).exists()
    assert not (workdirs["incremental"] / "profile").exists()


def test_rerunning_into_a_finished_workdir_is_refused(results, data_dir, workdirs):
    with pytest.raises(errors.ConfigError, match=r"already holds metrics\.json"):
        trainer.train_and_evaluate(digits_config(data_dir, "er"), str(workdirs["er"]))


def test_tfds_image_dataset_trains_end_to_end_with_augmentation(tmp_path, synthetic_data_dir):
    """A TFDS array_record dataset of JPEG images, read lazily, augmented on the device,
    through a CNN, with top-1 and top-5 matrices."""
    config = configuration.load_config("default:er")
    config.num_cpu_devices = 8
    config.dataset.name = "synthetic_cifar"
    config.dataset.data_dir = synthetic_data_dir
    config.model.name = "cnn"
    config.model.cnn.channels = (8,)
    config.model.cnn.dense_size = 16
    config.scenario.num_tasks = 2
    config.epochs_per_task = 1
    config.batch_size = 2
    run = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    acc = np.asarray(run["accuracy_matrix"])
    top5 = np.asarray(run["top5_accuracy_matrix"])
    assert acc.shape == top5.shape == (2, 2) and ((acc >= 0) & (acc <= 1)).all()
    assert (top5 >= acc).all()
    assert run["config"]["model"]["name"] == "cnn"
    assert run["config"]["dataset"]["augment"] == "crop_flip"
    assert len(run["task_timings"]) == 2 and run["data_wait_s"] >= 0


def test_the_step_gets_its_scalars_on_every_device_placed_again_only_when_they_change(
    tmp_path, data_dir, monkeypatch
):
    """The task id and the learning rate reach the step as arrays on every device of the
    run, with the task's and the schedule's values, and are copied to the devices again only
    when their value changes (a copy per step would cost every step)."""
    make_train_step, calls = steps.make_train_step, []

    def recording(*args):
        step = make_train_step(*args)

        def wrapped(state, rehearsal, batch, task_id, learning_rate):
            calls.append((task_id, learning_rate))
            return step(state, rehearsal, batch, task_id, learning_rate)

        return wrapped

    monkeypatch.setattr(steps, "make_train_step", recording)
    config = configuration.load_config("default:incremental")
    config.dataset.data_dir = data_dir
    config.scenario.num_tasks, config.epochs_per_task = 2, 2
    config.steps_per_dispatch = 1  # the single step, whose scalars are placed one by one
    config.optimizer.update(lr_scaling="linear", warmup_epochs=1.0)
    devices = trainer.train_and_evaluate(config, str(tmp_path / "run"))["num_devices"]

    for argument in (arg for call in calls for arg in call):
        assert argument.sharding.is_fully_replicated
        assert len(argument.sharding.device_set) == devices
    task_ids, rates = ([call[i] for call in calls] for i in (0, 1))
    assert [int(task_id) for task_id in task_ids] == sorted(int(t) for t in task_ids)
    assert {int(task_id) for task_id in task_ids} == {0, 1}
    peak = config.optimizer.learning_rate * devices
    assert float(rates[0]) == pytest.approx(config.optimizer.learning_rate)
    assert float(rates[-1]) == pytest.approx(peak)
    for arguments in (task_ids, rates):
        assert len({float(value) for value in arguments}) > 1
        for before, after in itertools.pairwise(arguments):
            assert (after is before) == (float(after) == float(before))


# What ER logs every logging.every_steps steps, and after every task (T<j>: each task).
STEP_SCALARS = {
    "train/loss",
    "train/new_ce",
    "train/replay_ce",
    "train/rep_weight",
    "train/learning_rate",
    "perf/samples_per_s",
    "perf/data_wait_fraction",
}
TASK_SCALARS = {
    *(
        f"{k}/{name}"
        for k in ("top1", "top5", "task_il")
        for name in ("T<j>", "average_accuracy", "forgetting")
    ),
    "time/train_s",
    "time/data_wait_s",
    "time/eval_s",
}


def test_tensorboard_files_hold_every_documented_scalar_once_per_point(results, workdirs):
    scalars = tensorboard_scalars(workdirs["er"])
    run = results["er"]
    num_tasks = len(run["accuracy_matrix"])
    task_steps = [step for step, _ in scalars["top1/average_accuracy"]]
    every = run["config"]["logging"]["every_steps"]
    expected = STEP_SCALARS | {
        tag.replace("<j>", str(j)) for tag in TASK_SCALARS for j in range(num_tasks)
    }
    assert scalars.keys() == expected
    for tag in STEP_SCALARS:
        assert [step for step, _ in scalars[tag]] == list(
            range(every, task_steps[-1] + 1, every)
        ), tag
    for tag in expected - STEP_SCALARS:
        assert [step for step, _ in scalars[tag]] == task_steps, tag
    assert [value for _, value in scalars["top1/T0"]] == pytest.approx(
        [row[0] for row in run["accuracy_matrix"]]
    )
    assert scalars["top1/forgetting"][-1][1] == pytest.approx(run["average_forgetting"])
    running = (REPO / "docs" / "running.md").read_text()
    for tag in STEP_SCALARS | TASK_SCALARS:
        assert f"`{tag}`" in running, f"{tag} is not documented in docs/running.md"


def test_every_task_leaves_its_plots(results, workdirs):
    for workdir in workdirs.values():
        for name in plots.PLOT_NAMES:
            png = (workdir / "plots" / f"{name}.png").read_bytes()
            assert png.startswith(b"\x89PNG") and len(png) > 10_000, name


@pytest.mark.parametrize("num_tasks", [2, 5, 20])
def test_the_run_plots_fixed_margins_hold_every_label(num_tasks):
    """Every title, axis label and tick label of the four run plots lies inside its figure
    (their margins are fixed, not solved for), with seconds of up to five digits."""
    rng = np.random.default_rng(0)
    acc = np.tril(rng.uniform(size=(num_tasks, num_tasks)))
    timings = [
        {"train_s": 4999.0 * t, "data_wait_s": 1.0, "eval_s": 10.0, "checkpoint_s": 5.0}
        for t in range(num_tasks)
    ]
    figures = [
        plots.accuracy_matrix_figure(acc),
        plots.average_accuracy_figure(acc),
        plots.task_accuracy_figure(acc),
        plots.time_breakdown_figure(timings),
    ]
    for figure in figures:
        canvas = FigureCanvasAgg(figure)
        canvas.draw()  # as saving does: the ticks and their labels are set at drawing time
        drawn = figure.get_tightbbox(canvas.get_renderer())  # inches, every artist drawn
        width, height = figure.get_size_inches()
        assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01, (figure.axes[0].get_title(), drawn)
        assert drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01, (
            figure.axes[0].get_title(),
            drawn,
        )


def test_report_table_and_figures_follow_the_metrics_files(
    results, workdirs, data_dir, tmp_path, capsys
):
    """Four strategies, a second ER seed, and a DER++ seed still running (3 of 5 tasks)."""
    config = digits_config(data_dir, "er")
    config.seed = 1
    trainer.train_and_evaluate(config, str(tmp_path / "er-1"))
    partial = json.loads((workdirs["derpp"] / "metrics.json").read_text())
    matrix = partial["accuracy_matrix"][:3]
    partial.update(
        status="running",
        accuracy_matrix=matrix,
        completed_tasks=3,
        **metrics.summary(np.asarray(matrix)),
    )
    partial["config"]["seed"] = 1
    (tmp_path / "derpp-1").mkdir()
    (tmp_path / "derpp-1" / "metrics.json").write_text(json.dumps(partial))
    runs = [str(w) for w in workdirs.values()] + [str(tmp_path / n) for n in ("er-1", "derpp-1")]
    capsys.readouterr()
    report.main([*runs, str(workdirs["er"]), "--out", str(tmp_path / "report")])
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: re.split(r"\s{2,}", line.strip()) for line in table[1:5]}
    files = {
        name: [json.loads((pathlib.Path(r) / "metrics.json").read_text()) for r in runs]
        for name in workdirs
    }
    for name, row in rows.items():
        group = [m for m in files[name] if m["config"]["strategy"]["name"] == name]
        accuracy = [m["final_average_accuracy"] for m in group]
        std = np.std(accuracy, ddof=1) if len(accuracy) > 1 else 0.0
        assert row[1] == str(len(group))
        assert row[3] == f"{np.mean(accuracy):.3f} ± {std:.3f}"
        ratio = np.mean([m["train_time_s"] for m in group]) / results["incremental"]["train_time_s"]
        assert row[-1] == f"{ratio:.2f}"
    assert rows["er"][1] == "2" and rows["derpp"][2] == "3/5" and rows["er"][2] == "5/5"
    assert "1 run(s) not finished" in table[5]
    for name in ("comparison.png", "accuracy_curves.png"):
        assert (tmp_path / "report" / name).read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit) as stop:
        report.main([*runs, "--out", str(tmp_path / "report")])
    assert stop.value.code == 2


def test_gdumb_learns_only_from_its_balanced_buffer_retrained_before_each_evaluation(
    data_dir, tmp_path, results
):
    """GDumb on 8 devices: the stream's steps learn nothing (tested in test_steps), so every
    accuracy comes from the model retrained from scratch on the buffer before each
    evaluation: far above fine-tuning's, with the earlier tasks remembered."""
    config = digits_config(data_dir, "gdumb")
    config.buffer.update(policy="class_balanced", partition="stream", size=160)
    config.strategy.gdumb.epochs = 20
    run = trainer.train_and_evaluate(config, str(tmp_path / "gdumb"))
    accuracy = np.asarray(run["accuracy_matrix"])
    assert run["final_average_accuracy"] > results["incremental"]["final_average_accuracy"] + 0.3
    assert accuracy[-1, 0] > 0.5 and accuracy[0, 0] > 0.8
