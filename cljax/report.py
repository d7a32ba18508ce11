"""Compares runs: `python -m cljax.report RUN_DIR [RUN_DIR ...] [--out DIR]`.

Each RUN_DIR is a run's workdir (its metrics.json is read; finished or still running) or a
directory of workdirs, such as runs/. Runs whose configs differ only in `seed` (and in
fields that change nothing computed, such as the data dir or the logging) form one group,
named by its strategy and, where two groups share a strategy, by the fields that differ (at
most three, by their last names). Runs of different datasets or scenarios are never compared:
the table gives each setting its own section, and each group's time is held against its own
setting's incremental group. A metrics.json that cannot be read is named in one warning line
and left out.

Prints one table row per group: runs, tasks done, and the mean ± standard deviation over
its runs of the final average accuracy, forgetting, top-5 and task-IL accuracy (where
recorded) and train time, and the train time relative to the incremental group's. Writes
into `--out` (default: a new `reports/<time>`): `comparison.png` (final average accuracy
against train time, the paper's picture), `accuracy_curves.png` (average accuracy after each
task) and `report.json` (the table's numbers).
"""

import argparse
import datetime
import json
import os
import sys

import numpy as np

from cljax import checkpoint, configuration, plots, workdir
from cljax.errors import ConfigError, warn

REPORT_FILES = ("comparison.png", "accuracy_curves.png", "report.json")
# metrics.json keys summarised over the runs of a group; the optional ones only where present.
OPTIONAL_COLUMNS = {
    "top5_final_average_accuracy": "top-5 avg acc",
    "task_il_final_average_accuracy": "task-IL avg acc",
}
SUMMARISED = ("final_average_accuracy", "average_forgetting", *OPTIONAL_COLUMNS, "train_time_s")
# Fields that may differ between the runs of one group.
SEED_FIELDS = ("seed",)
# What makes runs comparable at all: groups of different settings are tabled apart, and
# each setting's train times are held against its own incremental group.
SETTING_FIELDS = ("dataset.name", "scenario.name", "scenario.num_tasks")
# A label names at most this many fields that set its group apart, values cut to this long.
LABEL_FIELDS, LABEL_VALUE = 3, 12


def find_runs(paths: list[str]) -> list[tuple[str, dict]]:
    """(workdir, metrics) of every run under `paths`: each a workdir or a directory whose
    subdirectories are workdirs; each run once, however often it was named."""
    runs, seen = [], set()
    for path in paths:
        is_run = os.path.isfile(os.path.join(path, workdir.METRICS_NAME))
        for run in [path] if is_run else _workdirs_under(path):
            metrics = _read(os.path.join(run, workdir.METRICS_NAME))
            if metrics is not None and os.path.realpath(run) not in seen:
                seen.add(os.path.realpath(run))
                runs.append((run, metrics))
    if not runs:
        raise ConfigError("none of the runs given has finished a task yet; nothing to compare")
    return runs


def _workdirs_under(path: str) -> list[str]:
    found = sorted(
        os.path.join(path, name)
        for name in (os.listdir(path) if os.path.isdir(path) else [])
        if os.path.isfile(os.path.join(path, name, workdir.METRICS_NAME))
    )
    if not found:
        raise ConfigError(
            f"{path} holds no {workdir.METRICS_NAME}, nor do its subdirectories; give run"
            " workdirs (or a directory of them, such as runs/)"
        )
    return found


def _read(path: str) -> dict | None:
    """A run's metrics, or None (with a warning) if they cannot be read or it has not
    finished a task yet."""
    try:
        with open(path) as file:
            metrics = json.load(file)
    except (OSError, ValueError) as error:
        warn(f"{path} cannot be read ({type(error).__name__}: {error}); left out")
        return None
    if (
        not isinstance(metrics, dict)
        or "config" not in metrics
        or not metrics.get("accuracy_matrix")
    ):
        warn(f"{path} has no finished task yet; left out")
        return None
    return metrics


def group_runs(runs: list[tuple[str, dict]]) -> list[dict]:
    """The runs grouped by config up to the seed, each group summarised (see the module's
    docstring): the groups of one setting (dataset and scenario) together, in the order
    their first run was given."""
    members: list[list[tuple[str, dict]]] = []
    for run in runs:
        group = next(
            (g for g in members if not _differences(g[0][1]["config"], run[1]["config"])), None
        )
        if group is None:
            members.append([run])
        else:
            group.append(run)
    groups = [_summary(group) for group in members]
    _label(groups, [group[0][1]["config"] for group in members])
    for group in groups:
        incremental = next(
            (
                other
                for other in groups
                if other["strategy"] == "incremental" and other["setting"] == group["setting"]
            ),
            None,
        )
        group["time_vs_incremental"] = (
            group["train_time_s"]["mean"] / incremental["train_time_s"]["mean"]
            if incremental and incremental["train_time_s"]["mean"] > 0
            else None
        )
    return sorted(groups, key=lambda group: group["setting"])


def _differences(first: dict, second: dict) -> list[str]:
    """The config fields in which two resolved configs differ, other than the seed."""
    fields = checkpoint.changed_fields(first, second, same_devices=True)
    return [field for field in fields if field not in SEED_FIELDS]


def _summary(runs: list[tuple[str, dict]]) -> dict:
    metrics = [m for _, m in runs]
    num_tasks = len(metrics[0]["accuracy_matrix"][0])
    flat = configuration.flat_fields(metrics[0]["config"])
    summary = {
        "setting": ", ".join(f"{field}={flat.get(field)}" for field in SETTING_FIELDS),
        "strategy": metrics[0]["config"]["strategy"]["name"],
        "runs": len(runs),
        "workdirs": [path for path, _ in runs],
        "seeds": [m["config"]["seed"] for m in metrics],
        "statuses": [m["status"] for m in metrics],
        "completed_tasks": [m["completed_tasks"] for m in metrics],
        "num_tasks": num_tasks,
        "curves": [
            plots.average_accuracy_curve(np.asarray(m["accuracy_matrix"])).tolist() for m in metrics
        ],
    }
    for key in SUMMARISED:
        if all(key in m for m in metrics):
            summary[key] = _mean_std([m[key] for m in metrics])
    return summary


def _mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value), and the values."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": array.tolist()}


def _label(groups: list[dict], configs: list[dict]) -> None:
    """Names each group by its strategy, plus `field=value` for what sets it apart from the
    other groups of the same strategy and setting: at most `LABEL_FIELDS` fields, each by
    its last name, values cut short."""
    for index, group in enumerate(groups):
        same = [
            j
            for j, other in enumerate(groups)
            if (other["strategy"], other["setting"]) == (group["strategy"], group["setting"])
            and j != index
        ]
        fields = sorted({field for j in same for field in _differences(configs[index], configs[j])})
        flat = configuration.flat_fields(configs[index])
        shown = [f"{field.rsplit('.', 1)[-1]}={_short(flat.get(field))}" for field in fields]
        if len(shown) > LABEL_FIELDS:
            shown = [*shown[:LABEL_FIELDS], f"+{len(shown) - LABEL_FIELDS} more"]
        extra = ", ".join(shown)
        group["label"] = f"{group['strategy']} ({extra})" if extra else group["strategy"]
        if len({other["setting"] for other in groups}) > 1:
            setting = [flat.get(field) for field in SETTING_FIELDS]
            group["label"] += f" [{setting[0]}, {setting[1]}, {setting[2]} tasks]"


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= LABEL_VALUE else text[: LABEL_VALUE - 1] + "…"


def format_table(groups: list[dict]) -> str:
    """The comparison as text: mean ± sample standard deviation over each group's runs."""
    optional = [key for key in OPTIONAL_COLUMNS if any(key in g for g in groups)]
    header = [
        "group",
        "runs",
        "tasks",
        "final avg acc",
        "forgetting",
        *(OPTIONAL_COLUMNS[key] for key in optional),
        "train time (s)",
        "÷ incremental",
    ]
    rows, settings = [header], []
    for group in groups:
        if not settings or settings[-1][0] != group["setting"]:
            settings.append((group["setting"], len(rows)))
        ratio = group["time_vs_incremental"]
        rows.append(
            [
                group["label"],
                str(group["runs"]),
                f"{min(group['completed_tasks'])}/{group['num_tasks']}",
                _cell(group.get("final_average_accuracy"), 3),
                _cell(group.get("average_forgetting"), 3),
                *(_cell(group.get(key), 3) for key in optional),
                _cell(group.get("train_time_s"), 1),
                "-" if ratio is None else f"{ratio:.2f}",
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    if len(settings) > 1:  # runs of different settings are never compared: say which is which
        for setting, row in reversed(settings):
            lines.insert(row, f"-- {setting} (not comparable with the other settings)")
    running = sum(status != "finished" for g in groups for status in g["statuses"])
    note = (
        f"; {running} run(s) not finished: their numbers are after the tasks done"
        if running
        else ""
    )
    lines.append(f"mean ± sample standard deviation over each group's runs{note}")
    return "\n".join(lines)


def _cell(stats: dict | None, digits: int) -> str:
    return "-" if stats is None else f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def write_report(groups: list[dict], out: str) -> list[str]:
    """The figures and report.json in `out`; returns their paths."""
    num_tasks = max(group["num_tasks"] for group in groups)
    paths = plots.save_figures(
        out,
        {
            "comparison": plots.comparison_figure(groups),
            "accuracy_curves": plots.curves_figure(groups, num_tasks),
        },
    )
    path = os.path.join(out, "report.json")
    with open(path, "w") as file:
        json.dump({"groups": groups}, file, indent=1, allow_nan=False)
    return [*paths, path]


def _output_directory(out: str | None) -> str:
    """`out` (created if missing, refused if it holds a report), or a new reports/<time>."""
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return workdir.unique_directory("reports", stamp, "--out")
    existing = [name for name in REPORT_FILES if os.path.exists(os.path.join(out, name))]
    if existing:
        raise ConfigError(
            f"--out={out} holds a report already ({existing[0]}); pass a new --out, or leave"
            " it out for a new reports/<time>"
        )
    os.makedirs(out, exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cljax.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default=None, help="directory for the figures and report.json")
    args = parser.parse_args(argv)
    try:
        groups = group_runs(find_runs(args.run_dirs))
        out = _output_directory(args.out)
    except (ConfigError, OSError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_table(groups))
    paths = write_report(groups, out)
    print(f"figures and numbers: {', '.join(paths)}")


if __name__ == "__main__":
    main()
