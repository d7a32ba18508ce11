"""The notebooks run top to bottom in a Jupyter kernel, against the current API, and show
their pictures; a cell that fails fails the test."""

import json

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # every test here trains or starts processes

NOTEBOOKS = REPO / "notebooks"
# Run after each notebook's own cells, in the same kernel: the final average accuracy of
# every strategy, which the test checks.
CHECKS = {
    "quickstart.ipynb": "accuracy = {k: m['final_average_accuracy'] for k, m in results.items()}",
    "strategies.ipynb": (
        "accuracy = {g['strategy']: g['final_average_accuracy']['mean'] for g in groups}"
    ),
}
PRINT_RESULTS = "\nimport json\nprint('RESULTS', json.dumps(accuracy))"
PICTURES = {"quickstart.ipynb": 3, "strategies.ipynb": 2}


def execute(name: str, check_cell: str, data_dir: str, monkeypatch) -> list[dict]:
    """The outputs of every cell of notebooks/`name`, run with `check_cell` appended."""
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel simulates its own devices
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(check_cell))
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    ).execute()
    return [output for cell in notebook.cells for output in cell.get("outputs", [])]


def results(outputs: list[dict]) -> dict:
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    line = next(x for x in text.splitlines() if x.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs_and_its_strategies_order_as_the_method_predicts(name, data_dir, monkeypatch):
    outputs = execute(name, CHECKS[name] + PRINT_RESULTS, data_dir, monkeypatch)
    accuracy = results(outputs)
    assert accuracy["from_scratch"] > accuracy["er"] > accuracy["incremental"] + 0.3
    assert images(outputs) == PICTURES[name]
