"""Dependencies point one way: stage 1 (extract/) and stage 2 (train/) import nothing from the evaluation
(translate/), and the evaluation reads no training internals (train/trainer.py). The types both sides
share (n2n.scoring, cinn.gaussian, train.heldout) sit below them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (inside functions too), by its full name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", ["extract", "train", "shards", "cinn", "parallel"])
def test_the_stages_import_nothing_from_the_evaluation(folder):
    for path in sorted((REPO / folder).rglob("*.py")):
        assert not any(name.startswith("n2n.translate") for name in imported(path)), path


def test_the_evaluation_reads_no_training_internals():
    for path in sorted((REPO / "translate").rglob("*.py")):
        assert "n2n.train.trainer" not in imported(path), path


def test_the_model_stands_alone():
    for path in sorted((REPO / "cinn").rglob("*.py")):
        assert all(name.split(".")[0] in ("torch", "yaml", "n2n", "__future__", "dataclasses", "math", "itertools",
                                          "typing", "os", "pathlib", "collections")
                   and not name.startswith(("n2n.train", "n2n.shards", "n2n.extract", "n2n.translate"))
                   for name in imported(path)), path
