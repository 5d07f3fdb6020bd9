"""The package's layers: every import goes downward (or stays in its own layer), and no module
reaches into another's private names. docs/design.md explains the layers.

The check reads the source with ``ast`` (imports inside functions and under ``TYPE_CHECKING``
count: they are dependencies all the same) and is itself tested on a tree with an upward import
planted on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pedetect

# Bottom to top. A module may import from its own layer and the layers below it.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"__init__", "_lazy", "labels", "io", "config", "recipe", "runtime", "console", "options"}),
    frozenset({"dicom", "metric", "synth"}),
    frozenset({"store"}),
    frozenset({"data"}),
    frozenset({"models"}),
    frozenset({"train"}),
    frozenset({"infer", "export", "view"}),
    frozenset({"hospital"}),  # DICOM results, the node, DICOMweb: consumers of infer's predictions
    frozenset({"demo", "testing"}),
    frozenset({"cli", "__main__"}),
)
PACKAGE_ROOT = Path(pedetect.__file__).parent


def layer_of(unit: str) -> int:
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise KeyError(
        f"pedetect.{unit} is in no layer of tests/test_architecture.py: add it to LAYERS (and docs/design.md)"
    )


def unit_of(module: str) -> str:
    """``pedetect.train.cnn`` → ``train``; ``pedetect`` → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(root: Path, path: Path) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every pedetect import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.split(".")[0] == "pedetect"]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "pedetect"
        ):
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def layering_violations(root: Path) -> list[str]:
    """Every upward import and every private name imported from another module, under ``root``
    (the ``pedetect`` package folder)."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        source = module_name(root, path)
        own_unit = unit_of(source)
        for line, target, names in imports_of(path):
            where = f"{path.relative_to(root.parent)}:{line}"
            if layer_of(unit_of(target)) > layer_of(own_unit):
                problems.append(
                    f"{where}: {source} (layer {layer_of(own_unit)}) imports {target} (layer {layer_of(unit_of(target))})"
                )
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != source:
                problems.append(f"{where}: {source} imports private {', '.join(private)} from {target}")
    return problems


def test_every_import_goes_downward_and_no_private_name_crosses_a_module():
    assert layering_violations(PACKAGE_ROOT) == []


def test_every_unit_of_the_package_has_a_layer():
    units = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE_ROOT.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert units - set().union(*LAYERS) == set()


def _plant(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_check_finds_an_upward_import_planted_on_purpose(tmp_path):
    root = tmp_path / "pedetect"
    _plant(root, "__init__.py", "")
    _plant(root, "labels.py", "")
    _plant(root, "data/__init__.py", "")
    _plant(root, "train/__init__.py", "")
    _plant(root, "train/setup.py", "from pedetect.data.folds import FOLD\n")  # downward: fine
    _plant(root, "data/folds.py", "from pedetect.labels import STUDY\n")  # downward: fine
    assert layering_violations(root) == []

    # The case issue 15 removed: data importing the training recipe from train, hidden in a function.
    _plant(root, "data/dataset.py", "def f():\n    from pedetect.train.setup import TrainError\n")
    # And one under TYPE_CHECKING, and a private helper reached across modules.
    _plant(
        root,
        "data/augment.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pedetect.train.setup\n",
    )
    _plant(root, "train/cnn.py", "from pedetect.data.folds import _helper\n")
    problems = layering_violations(root)
    assert len(problems) == 3, problems
    assert (
        "pedetect/data/dataset.py:2: pedetect.data.dataset (layer 3) imports pedetect.train.setup (layer 5)" in problems
    )
    assert any(p.startswith("pedetect/data/augment.py:3:") for p in problems)
    assert "pedetect/train/cnn.py:1: pedetect.train.cnn imports private _helper from pedetect.data.folds" in problems


def test_the_check_finds_infer_importing_hospital(tmp_path):
    """hospital sits above infer: predict's DICOM results are hospital's consumers of its predictions,
    so an import back from infer would be a cycle between the two."""
    root = tmp_path / "pedetect"
    _plant(root, "__init__.py", "")
    _plant(root, "infer/__init__.py", "")
    _plant(root, "hospital/__init__.py", "")
    _plant(root, "hospital/answer.py", "from pedetect.infer.predictor import Predictor\n")  # downward: fine
    assert layering_violations(root) == []
    _plant(root, "infer/predict.py", "def f():\n    from pedetect.hospital.results import write_results\n")
    assert layering_violations(root) == [
        "pedetect/infer/predict.py:2: pedetect.infer.predict (layer 6) imports pedetect.hospital.results (layer 7)"
    ]


def test_a_unit_without_a_layer_is_named():
    with pytest.raises(KeyError, match="pedetect.viewer is in no layer"):
        layer_of("viewer")
