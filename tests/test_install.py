"""cljax as a user installs it: a wheel, in a virtual environment outside the clone, used from
another directory. Its configs must come with it."""

import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.helpers import REPO, run_process, subprocess_env


def run(*command: str, cwd, **env: str) -> subprocess.CompletedProcess:
    return run_process(
        list(command),
        cwd=cwd,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh virtual environment holding only cljax's wheel, built from a copy of the clone
    (a build writes into its source tree); the packages cljax needs come from this
    environment's site-packages, added as a path (so that its editable install of the clone
    is not)."""
    root = tmp_path_factory.mktemp("install")
    ignored = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, root / "source", ignore=ignored)
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", "wheels", root / "source", cwd=root
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "wheels").glob("cljax-*.whl")
    venv = root / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root)
    site_packages = site.stdout.strip()
    target = ("--target", site_packages, "--no-deps", "--no-compile", str(wheel))
    installed = run(sys.executable, "-m", "pip", "install", *target, cwd=root)
    assert installed.returncode == 0, installed.stderr[-3000:]
    with open(f"{site_packages}/cljax_dependencies.pth", "w") as paths:
        paths.write(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_the_wheel_loads_its_configs_from_any_directory(venv, tmp_path):
    code = (
        "import cljax\n"
        "config = cljax.load_config('default:er')\n"
        "mnist = cljax.load_config('mnist_der:derpp-500')\n"
        "print(cljax.__file__, config.strategy.name, mnist.buffer.size)\n"
    )
    result = run(str(venv / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    location, strategy, size = result.stdout.split()
    assert location.startswith(str(venv)) and str(REPO) not in location
    assert (strategy, size) == ("er", "500")


@pytest.mark.slow
def test_the_wheel_trains_the_default_experiment_from_any_directory(venv, tmp_path, data_dir):
    result = run(
        str(venv / "bin" / "python"),
        "-m",
        "cljax.train",
        "--config.epochs_per_task=1",
        f"--workdir={tmp_path / 'run'}",
        cwd=tmp_path,
        TFDS_DATA_DIR=data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert "final_average_accuracy=" in result.stdout
