"""Imports point one way: the layer table of docs/contributing.md read as rules, read from every import of every
module (those inside functions too), and no cycle between the package's parts.

A part is a top-level folder (``n2n.train``) or a module at the package's root (``n2n.cli``). Imports under
``if TYPE_CHECKING:`` are left out: they never run (a contract such as ``n2n.scoring`` names the types it is
handed). So are the deprecated modules that keep an old import path alive (their docstring says so).
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("cinn", "parallel", "shards", "extract", "train", "translate", "evaluate", "diagnose")
TABLE = REPO / "docs" / "contributing.md"


def read_table() -> dict[str, set[str]]:
    """The layer table of docs/contributing.md: each part (``cli``, ``train``) and the parts it may import
    (``extract.experts``: that subpackage only), from the backticked names of its last column."""
    text = TABLE.read_text(encoding="utf-8")
    table = text[text.index("| part | role | may import (of n2n) |"):].split("\n\n")[0]
    rules = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`[\w.]+(/|\.py)`", cells[0]):
            part = cells[0].strip("`").removesuffix("/").removesuffix(".py")
            rules[part] = set(re.findall(r"`([\w.]+)`", cells[2]))
    return rules


MAY_IMPORT = read_table()
DEPRECATED = "Deprecated: moved to"


def part_of(path: Path) -> str:
    relative = path.relative_to(REPO)
    return relative.parts[0] if relative.parts[0] in FOLDERS else relative.stem


def modules() -> list[Path]:
    found = [*REPO.glob("*.py"), *(path for folder in FOLDERS for path in (REPO / folder).rglob("*.py"))]
    return sorted(path for path in found if not (ast.get_docstring(ast.parse(path.read_text())) or "")
                  .startswith(DEPRECATED))


def imported(path: Path) -> set[str]:
    """Every n2n module a file imports, anywhere in it but under ``if TYPE_CHECKING:``, by its full name
    (``from n2n import plugins`` is n2n.plugins)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {f"n2n.{alias.name}" for alias in node.names} if node.module == "n2n" else {node.module}
    return {name for name in names if name == "n2n" or name.startswith("n2n.")}


def allowed(part: str, name: str) -> bool:
    if name == "n2n" or name == "n2n.__version__":
        return True
    target = name.split(".")[1]
    rules = MAY_IMPORT[part]
    return target == part or target in rules or any(name == f"n2n.{rule}" or name.startswith(f"n2n.{rule}.")
                                                    for rule in rules if "." in rule)


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(REPO)))
def test_every_import_follows_the_layer_table(path):
    part = part_of(path)
    wrong = sorted(name for name in imported(path) if not allowed(part, name))
    assert not wrong, f"{path.relative_to(REPO)} ({part}) imports {wrong}; the table allows {sorted(MAY_IMPORT[part])}"


def test_the_table_has_no_cycle():
    """Each part's allowed imports lie strictly below it: the table is an order."""
    def below(part: str, seen: tuple[str, ...] = ()) -> None:
        assert part not in seen, " -> ".join((*seen, part))
        for rule in MAY_IMPORT[part]:
            below(rule.split(".")[0], (*seen, part))

    for part in MAY_IMPORT:
        below(part)


def test_the_table_names_every_part():
    parts = {part_of(path) for path in modules()}
    assert parts == set(MAY_IMPORT), f"parts without a row: {parts - set(MAY_IMPORT)}; rows of no part: " \
                                     f"{set(MAY_IMPORT) - parts}"


@pytest.mark.parametrize("old, new", [("n2n.translate.evaluate", "n2n.evaluate.api"),
                                      ("n2n.translate.metrics", "n2n.evaluate.metrics"),
                                      ("n2n.translate.baseline", "n2n.evaluate.baseline"),
                                      ("n2n.translate.figures", "n2n.evaluate.figures"),
                                      ("n2n.translate.texts", "n2n.evaluate.texts")])
def test_a_moved_module_still_imports_from_its_old_path_with_a_warning(old, new):
    import importlib
    import sys

    for name in (old, new):
        sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and new.rsplit(".", 1)[0] in str(w.message)
               for w in caught)
    assert all(getattr(module, name) is getattr(importlib.import_module(new), name)
               for name in getattr(importlib.import_module(new), "__all__", [])
               if not name.startswith("_"))
    if old == "n2n.translate.evaluate":
        from n2n.evaluate.cli import main

        assert module.main is main and callable(module.evaluate)
    else:
        assert module is importlib.import_module(new)
