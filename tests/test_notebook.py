"""The quick-start notebook runs top to bottom against the current API, in a fresh process."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_reproduces_the_strategy_ordering(data_dir):
    with open(NOTEBOOK) as file:
        cells = json.load(file)["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    report = (
        "\nimport json\n"
        "print('RESULTS', json.dumps({k: v['final_average_accuracy'] for k, v in results.items()}))"
    )
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["TFDS_DATA_DIR"] = data_dir
    result = subprocess.run(
        [sys.executable, "-c", code + report],
        cwd=os.path.dirname(NOTEBOOK),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULTS "))
    accuracy = json.loads(line.removeprefix("RESULTS "))
    assert accuracy["from_scratch"] > accuracy["er"] > accuracy["incremental"] + 0.3
