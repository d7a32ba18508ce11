"""The package's shape: which module may know what."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cljax"


def compared_names(tree: ast.AST) -> set[str]:
    """Every string constant and attribute name that takes part in a comparison."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                for leaf in ast.walk(operand):
                    if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str):
                        names.add(leaf.value)
                    elif isinstance(leaf, ast.Attribute):
                        names.add(leaf.attr)
    return names


def test_only_the_runtime_tests_which_backend_runs():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "runtime.py":
            continue
        names = compared_names(ast.parse(path.read_text()))
        assert not names & {"mpi", "backend", "_backend"}, path


def test_the_check_sees_a_backend_test(tmp_path):
    assert "mpi" in compared_names(ast.parse("if config.backend == 'mpi': pass"))


MAX_MODULE_LINES = 450
MAX_TRAINER_LINES = 150
# The modules that may hold a whole config: loading, checking and planning it, and the
# entry points that hand it to the plan.
CONFIG_MODULES = {"configuration.py", "checks.py", "train.py", "trainer.py", "run/plan.py"}


def modules() -> dict[str, ast.Module]:
    return {
        path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def takes_a_whole_config(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A parameter named `config`, or annotated as a (mutable) `ConfigDict`."""
    arguments = function.args
    for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
        annotation = ast.unparse(argument.annotation) if argument.annotation else ""
        if argument.arg == "config" or annotation.split(".")[-1] == "ConfigDict":
            return True
    return False


def functions_taking_a_config(tree: ast.Module) -> list[str]:
    return [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and takes_a_whole_config(node)
    ]


def test_no_module_is_longer_than_450_lines_and_the_trainer_150():
    for path in PACKAGE.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES, path
    assert len((PACKAGE / "trainer.py").read_text().splitlines()) <= MAX_TRAINER_LINES


def test_after_the_plan_no_module_receives_the_whole_config():
    for name, tree in modules().items():
        taking = functions_taking_a_config(tree)
        if name == "trainer.py":
            assert taking == ["train_and_evaluate"]
        elif name not in CONFIG_MODULES:
            assert not taking, f"{name}: {taking} take the whole config"


def test_the_config_check_sees_a_function_that_takes_the_config():
    tree = ast.parse(
        "def a(config): pass\n"
        "def b(x: ml_collections.ConfigDict): pass\n"
        "def c(x: ml_collections.FrozenConfigDict, section: dict): pass\n"
    )
    assert functions_taking_a_config(tree) == ["a", "b"]
