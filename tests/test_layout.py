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
