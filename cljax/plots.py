"""The pictures of a run, drawn from its metrics.json, and of a comparison of runs.

`write_run_plots` writes, into `<workdir>/plots`: the top-1 accuracy matrix as a heatmap,
the average accuracy after each task, each task's accuracy over the stream, and where each
task's time went. `comparison_figure` and `curves_figure` are `python -m cljax.report`'s.
Every function takes plain dicts and lists, so a notebook can call them on any run. Figures
are made without pyplot: no GUI backend is needed or changed, and none is left open.
"""

import os

import matplotlib
import numpy as np
from matplotlib.figure import Figure

PLOTS_DIRECTORY = "plots"
PLOT_NAMES = ("accuracy_matrix", "average_accuracy", "task_accuracy", "time_breakdown")
TIME_PARTS = (
    ("compute", "training (compilation included)"),
    ("data_wait_s", "data wait"),
    ("eval_s", "evaluation"),
    ("checkpoint_s", "checkpointing"),
)
# The run's plots have margins of fixed inches around their axes (room for their titles,
# axis labels and tick labels of up to five characters), where a layout solver
# (`tight_layout`) would take 0.19 s of the 0.5 s the four plots take to draw; the run
# draws them at its end, and a small benchmark's whole run lasts 3 s.
MARGINS_INCHES = {"left": 0.75, "right": 0.25, "bottom": 0.6, "top": 0.4}
# PNG compression: level 1 writes the plots 0.04 s faster than the default 6, in files a
# few kB larger.
PNG_OPTIONS = {"compress_level": 1}


def average_accuracy_curve(acc: np.ndarray) -> np.ndarray:
    """Mean accuracy over the tasks seen so far, after each trained task."""
    return np.array([row[: i + 1].mean() for i, row in enumerate(acc)])


def accuracy_matrix_figure(acc: np.ndarray, title: str = "") -> Figure:
    """Heatmap of acc[i, j], accuracy on task j after training task i; unseen tasks grey."""
    trained, num_tasks = acc.shape
    figure = _run_figure(max(4.0, 1.0 + 0.8 * num_tasks), 0.8 + 0.7 * max(trained, 1))
    axes = figure.subplots()
    seen = np.ma.masked_where(np.arange(num_tasks)[None, :] > np.arange(trained)[:, None], acc)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.9")
    image = axes.imshow(seen, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    if num_tasks <= 20:
        for (i, j), value in np.ndenumerate(acc):
            if j <= i:
                colour = "black" if value > 0.6 else "white"
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, size=8)
    axes.set_xticks(range(num_tasks), [f"T{j}" for j in range(num_tasks)])
    axes.set_yticks(range(trained), [f"T{i}" for i in range(trained)])
    axes.set_xlabel("evaluated on task")
    axes.set_ylabel("after training task")
    axes.set_title(title or "top-1 accuracy (grey: not trained yet)")
    figure.colorbar(image, ax=axes, label="accuracy")
    return figure


def average_accuracy_figure(acc: np.ndarray) -> Figure:
    figure = _run_figure(5, 3.5)
    axes = figure.subplots()
    axes.plot(np.arange(len(acc)), average_accuracy_curve(acc), marker="o")
    _accuracy_axes(axes, acc.shape[1])
    axes.set_ylabel("average accuracy on seen tasks")
    axes.set_title("average top-1 accuracy after each task")
    return figure


def task_accuracy_figure(acc: np.ndarray) -> Figure:
    """One line per task: its accuracy from the moment it was trained on."""
    figure = _run_figure(5.5, 3.5)
    axes = figure.subplots()
    trained = len(acc)
    for j in range(trained):
        axes.plot(np.arange(j, trained), acc[j:, j], marker="o", label=f"T{j}")
    _accuracy_axes(axes, acc.shape[1])
    axes.set_ylabel("top-1 accuracy on the task")
    axes.set_title("each task's accuracy over the stream")
    axes.legend(title="task", fontsize=8, ncol=2 if trained > 6 else 1)
    return figure


def time_breakdown_figure(timings: list[dict]) -> Figure:
    """Stacked bars per task: training compute, data wait, evaluation, checkpointing."""
    figure = _run_figure(5.5, 3.5)
    axes = figure.subplots()
    tasks = np.arange(len(timings))
    bottom = np.zeros(len(timings))
    for key, label in TIME_PARTS:
        if key == "compute":
            seconds = np.array([t["train_s"] - t["data_wait_s"] for t in timings])
        else:
            seconds = np.array([t.get(key, 0.0) for t in timings])
        axes.bar(tasks, seconds, bottom=bottom, label=label)
        bottom += seconds
    axes.set_xticks(tasks, [f"T{t}" for t in tasks])
    axes.set_xlabel("task")
    axes.set_ylabel("seconds")
    axes.set_title("where each task's time went")
    axes.legend(fontsize=8)
    return figure


def write_run_plots(directory: str, results: dict) -> list[str]:
    """The run's four PNGs in `<directory>/plots`, from metrics.json's `results`."""
    acc = np.asarray(results["accuracy_matrix"], dtype=float)
    if not len(acc):
        return []
    figures = {
        "accuracy_matrix": accuracy_matrix_figure(acc),
        "average_accuracy": average_accuracy_figure(acc),
        "task_accuracy": task_accuracy_figure(acc),
        "time_breakdown": time_breakdown_figure(results["task_timings"]),
    }
    return save_figures(os.path.join(directory, PLOTS_DIRECTORY), figures)


def save_figures(directory: str, figures: dict[str, Figure]) -> list[str]:
    """Writes each figure to `<directory>/<name>.png` (via a temporary file, so a reader
    never sees half an image) and closes it; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        path = os.path.join(directory, f"{name}.png")
        figure.savefig(path + ".tmp", format="png", dpi=120, pil_kwargs=PNG_OPTIONS)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def comparison_figure(groups: list[dict]) -> Figure:
    """The paper's picture: final average accuracy against train time, one point per
    group (mean over its seeds, bars: their standard deviation)."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for group in groups:
        axes.errorbar(
            group["train_time_s"]["mean"],
            group["final_average_accuracy"]["mean"],
            xerr=group["train_time_s"]["std"],
            yerr=group["final_average_accuracy"]["std"],
            marker="o",
            capsize=3,
            linestyle="none",
            label=f"{group['label']} (n={group['runs']})",
        )
    axes.set_xlabel("train time (s, all tasks)")
    axes.set_ylabel("final average top-1 accuracy")
    axes.set_ylim(0, 1.02)
    axes.set_xlim(left=0)
    axes.grid(alpha=0.3)
    axes.set_title("final accuracy against training time\n(mean ± standard deviation over seeds)")
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return figure


def curves_figure(groups: list[dict], num_tasks: int) -> Figure:
    """Average accuracy after each task, one line per group (mean, band: min to max)."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for group in groups:
        curves = group["curves"]
        longest = max(len(curve) for curve in curves)
        points = [np.array([c[i] for c in curves if len(c) > i]) for i in range(longest)]
        tasks = np.arange(longest)
        mean = np.array([p.mean() for p in points])
        (line,) = axes.plot(tasks, mean, marker="o", label=group["label"])
        low, high = [p.min() for p in points], [p.max() for p in points]
        axes.fill_between(tasks, low, high, alpha=0.2, color=line.get_color())
    _accuracy_axes(axes, num_tasks)
    axes.set_ylabel("average accuracy on seen tasks")
    axes.set_title(
        "average top-1 accuracy after each task\n(line: mean over seeds, band: min to max)"
    )
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    return figure


def _run_figure(width: float, height: float) -> Figure:
    """A figure of `width` x `height` inches whose axes leave `MARGINS_INCHES` around them."""
    margins = MARGINS_INCHES
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(
        left=margins["left"] / width,
        right=1 - margins["right"] / width,
        bottom=margins["bottom"] / height,
        top=1 - margins["top"] / height,
    )
    return figure


def _accuracy_axes(axes, num_tasks: int) -> None:
    """x: the task just trained, T0 to the last, as in the accuracy matrix; y: accuracy."""
    axes.set_xticks(range(num_tasks), [f"T{i}" for i in range(num_tasks)])
    axes.set_xlim(-0.3, num_tasks - 0.7)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("after training task")
    axes.grid(alpha=0.3)
