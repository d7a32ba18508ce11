"""The docs hold what is true: every Python block of the README and docs/ runs as written,
each in a fresh process; the README stays short and links every document."""

import os
import pathlib
import re
import sys

import pytest

from tests.helpers import REPO, run_process, subprocess_env

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250


def python_blocks() -> dict[tuple[str, int], str]:
    """Every ```python block of the docs, by (document, index within it)."""
    blocks = {}
    for path in DOCUMENTS:
        found = re.findall(r"```python\n(.*?)```", path.read_text(), re.DOTALL)
        for index, code in enumerate(found):
            blocks[(path.relative_to(REPO).as_posix(), index)] = code
    return blocks


# What a block must show besides running: code run after it, and the simulated devices.
CHECKS = {
    ("README.md", 0): (
        "assert metrics['status'] == 'finished' and len(metrics['accuracy_matrix']) == 5\n",
        1,
    ),
    ("README.md", 1): (
        "assert representatives.labels.shape == (8 * devices,) and devices == 4\n"
        "assert float(representatives.weights.sum()) == 8 * devices\n",
        4,
    ),
    ("docs/strategies.md", 0): (
        "assert metrics['config']['strategy']['distill'] == {'weight': 2.0}\n"
        "assert metrics['status'] == 'finished'\n",
        1,
    ),
}


def run_block(code: str, cwd: pathlib.Path, data_dir: str, devices: int):
    env = subprocess_env(TFDS_DATA_DIR=data_dir, JAX_NUM_CPU_DEVICES=str(devices))
    return run_process(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize("block", sorted(python_blocks()), ids=lambda block: "{}:{}".format(*block))
def test_every_python_block_of_the_docs_runs(block, tmp_path, data_dir):
    after, devices = CHECKS.get(block, ("", 1))
    result = run_block(python_blocks()[block] + after, tmp_path, data_dir, devices)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_check_names_a_block_that_exists():
    assert set(CHECKS) <= set(python_blocks())


def test_the_readme_is_short_and_links_every_document():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for path in DOCUMENTS[1:]:
        assert f"(docs/{path.name})" in readme, path.name


def test_every_relative_link_of_the_docs_reaches_a_file():
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert os.path.exists(path.parent / target), f"{path.name}: {target}"
