"""Static checks of the gallery examples (they are executed by ``make docs``, not here).

Examples must leave no trace: no files written into the repository or the working
directory (sphinx-gallery captures the figures), and they run headless.
"""

import ast
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_there_are_examples():
    assert len([p for p in EXAMPLES if p.name.startswith("plot_")]) >= 6


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            yield name, node


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_writes_no_files(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for name, node in _calls(tree):
        assert name not in {"savefig", "imsave", "save", "savez", "savez_compressed",
                            "tofile", "to_csv", "write_text", "write_bytes", "mkdir",
                            "dump"}, f"{path.name}:{node.lineno} calls {name}()"
        if name == "open":
            modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            modes += [k.value.value for k in node.keywords
                      if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            assert not any(set(str(m)) & set("wax+") for m in modes), (
                f"{path.name}:{node.lineno} opens a file for writing")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_has_a_gallery_title(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
    assert doc is not None, f"{path.name} has no docstring"
    lines = doc.strip("\n").splitlines()
    assert len(lines) >= 3 and set(lines[0]) == {"="} and set(lines[2]) == {"="}, (
        f"{path.name}: the docstring must start with an over- and underlined title")
    assert len(lines[0]) == len(lines[1]) == len(lines[2]), f"{path.name}: title length"
