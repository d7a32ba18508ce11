"""The README's code runs as written, each block in a fresh process."""

import json
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first python block after `heading` in the README."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def run_python(code: str, cwd, data_dir: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    if data_dir:
        env["TFDS_DATA_DIR"] = data_dir
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_buffer_example_runs_in_a_plain_script_on_one_device(tmp_path):
    code = readme_block("## Use the buffer in your own train step")
    code += "\nassert jax.device_count() == 1 and representatives.weights.tolist() == [1.0] * 8\n"
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_strategy_example_trains_with_its_own_state_and_hyperparameter(tmp_path, data_dir):
    code = readme_block("### Adding a strategy") + (
        "\nimport json\n"
        "from cljax import configuration, trainer\n"
        "config = configuration.load_config()\n"
        "config.strategy.name = 'distill'\n"
        "config.strategy.distill.weight = 2.0\n"
        "config.num_cpu_devices, config.epochs_per_task, config.scenario.num_tasks = 2, 1, 2\n"
        f"result = trainer.train_and_evaluate(config, {str(tmp_path / 'run')!r})\n"
        "print('RESULT', json.dumps(result['config']['strategy']['distill']))\n"
    )
    result = run_python(code, tmp_path, data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    assert json.loads(line.removeprefix("RESULT ")) == {"weight": 2.0}
