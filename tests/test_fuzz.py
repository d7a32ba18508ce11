"""200 random plausible-but-wrong configs: never a traceback, a hang, or a run that exits 0
with non-finite or non-standard numbers in metrics.json."""

import collections
import json
import os
import pathlib
import sys

import pytest

from tests.helpers import run_process

pytestmark = pytest.mark.slow  # every test here trains or starts processes

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_plausible_but_wrong_configs_fail_in_one_line_or_run_cleanly(data_dir, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    result = run_process(
        [sys.executable, str(REPO / "tests" / "fuzz_cli.py"), data_dir, str(tmp_path), "200", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(runs) == 200
    for run in runs:
        assert run["escaped"] is None, run
        if run["status"] == 0:
            assert run["metrics_ok"], run
        else:
            assert run["last_line"].startswith("cljax: ") and "Traceback" not in run["last_line"]
    statuses = collections.Counter(run["status"] for run in runs)
    assert statuses[2] > 100 and statuses[0] > 5, statuses
