"""n2n-shards: list, inspect, verify, pair and convert latent stores.

Every user error (a wrong path, a damaged store, an option out of range) is an N2NError: it is
printed as one line, ``error: <what and how to fix it>``, and the command exits with status 2, never
with a traceback (``n2n.cli.reports_errors``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from n2n import plugins
from n2n.cli import CONTEXT, PATH_OR_URL, reports_errors
from n2n.files import as_path
from n2n.shards.errors import StoreError
from n2n.shards.formats import FORMATS
from n2n.shards.meta import META_NAME
from n2n.shards.parts import commit_parts
from n2n.shards.reader import Store, open_store
from n2n.shards.synthetic import LAWS
from n2n.shards.verify import convert_store, verify_store
from n2n.shards.view import VIEW_NAME, open_view, view_stores
from n2n.shards.view import pair as pair_stores

FORMAT_HELP = f"{', '.join(FORMATS)} or an installed plug-in's format (n2n-shards ls lists them)"


def _console() -> Console:
    # Made per command, so output goes to the stdout of the moment (click's test runner swaps it).
    return Console(highlight=False, soft_wrap=True)


def _require(path: Path) -> None:
    if not path.exists():
        raise StoreError(f"no latent store or view at {path}: run n2n-extract or check the path")


def _is_view(path: Path) -> bool:
    return (path / VIEW_NAME).is_file()


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Latent stores (one expert over one dataset) and views (two stores joined on the item key)."""


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """("store" | "view", path) for every store and view under root; stores are not descended into."""
    for directory, subdirs, files in os.walk(root):
        kind = "view" if VIEW_NAME in files else "store" if META_NAME in files else None
        if kind:
            yield kind, Path(directory)
        if kind == "store":
            subdirs.clear()
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # .NAME.creating: a create cut off


def _expert(store: Store) -> str:
    expert = store.meta.get("expert")
    return str(expert.get("spec", expert) if isinstance(expert, dict) else expert or "")


def _table(title: str, *columns: str) -> Table:
    """A table whose cells fold, never cut (a cut path is useless); the first column, a path, wins width."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, overflow="fold", no_wrap=i == 0)
    return table


@main.command("ls")
@click.argument("root", default="shards", type=click.Path(path_type=Path))
@reports_errors
def ls(root: Path) -> None:
    """List the stores and views under ROOT (default: ./shards)."""
    _require(root)
    stores = _table(f"stores in {root}", "store", "format", "rows", "dim", "dtype", "complete", "expert")
    views = _table(f"views in {root}", "view", "source -> target")
    for kind, path in _walk(root):
        name = str(path.relative_to(root)) if path != root else str(path)
        if kind == "view":
            views.add_row(escape(name), _view_row(path, root))
            continue
        try:
            store = open_store(path, require_complete=False)
        except StoreError as err:
            stores.add_row(escape(name), "[red]damaged[/red]", "", "", "", "", escape(str(err)))
            continue
        stores.add_row(
            escape(name), store.format, str(len(store)), str(store.dim), store.dtype.name,
            "yes" if store.complete else "[yellow]no[/yellow]", escape(_expert(store)),
        )  # fmt: skip
    console = _console()
    console.print(stores)
    console.print(views)
    for kind in plugins.GROUPS:
        console.print(f"{kind} plug-ins: {escape(plugins.listing(kind))}")


def _view_row(path: Path, root: Path) -> str:
    try:
        source, target = view_stores(path)
    except StoreError as err:
        return f"[red]damaged[/red] {escape(str(err))}"
    return escape(f"{os.path.relpath(source, root)} -> {os.path.relpath(target, root)}")


@main.command()
@click.argument("path", type=PATH_OR_URL)
@reports_errors
def info(path: Path) -> None:
    """Show a store's meta, or a view's two stores and its pair count."""
    _require(path)
    console = _console()
    if _is_view(path):
        view = open_view(path)
        for role, store in (("source", view.source), ("target", view.target)):
            console.print(f"[bold]{role}[/bold] {escape(str(store.path))}")
            console.print_json(data=store.identity())
        console.print(f"pairs: {len(view.join())}")
    else:
        store = open_store(path, require_complete=False)
        console.print(f"[bold]store[/bold] {escape(str(store.path))}")
        console.print_json(data=store.meta)


@main.command()
@click.argument("path", type=PATH_OR_URL)
@reports_errors
def verify(path: Path) -> None:
    """Check a store (or a view's two stores and their join); exit 1 if there are problems."""
    _require(path)
    problems = _verify_view(path) if _is_view(path) else verify_store(path)
    console = _console()
    for problem in problems:
        console.print(f"[red]problem:[/red] {escape(problem)}")
    if problems:
        raise SystemExit(1)
    console.print("ok")


def _verify_view(path: Path) -> list[str]:
    """The problems of both stores, then of the join (which needs both stores readable)."""
    problems = [problem for store in view_stores(path) for problem in verify_store(store)]
    if not problems:
        try:
            open_view(path).join()
        except StoreError as err:
            problems.append(str(err))
    return problems


@main.command()
@click.argument("source", type=PATH_OR_URL)
@click.argument("target", type=PATH_OR_URL)
@click.option("--name", default=None, help="View name: the view is written to ROOT/NAME.  [default: SOURCE_TARGET, "
              "the stores' folder names]")
@click.option("--root", default=None, type=PATH_OR_URL,
              help="Where views go.  [default: the shards root the stores sit under, shards/<data>/<expert>]")
@reports_errors
def pair(source: Path, target: Path, name: str | None, root: Path | None) -> None:
    """Create a view that translates SOURCE store latents into TARGET store latents (n2n.pair)."""
    view = pair_stores(source, target, name, root)
    _console().print(f"view {view.path}: {len(view.join())} pairs", markup=False)


@main.command()
@click.argument("path", type=PATH_OR_URL)
@reports_errors
def commit(path: Path) -> None:
    """Join the parts of PATH written by several processes (PATH.parts/) into the store PATH.

    Rank 0 of a distributed n2n-extract does this itself once every rank is done; run it by hand
    where the ranks ran as separate jobs. Safe to repeat: a commit cut off is redone from the parts.
    """
    store = open_store(commit_parts(path))
    _console().print(f"committed {store.path}: {len(store)} rows, complete")


@main.command()
@click.argument("path", type=PATH_OR_URL)
@click.option("--format", "format_", required=True, help=FORMAT_HELP)
@click.option("--out", type=PATH_OR_URL, help="Destination (default: PATH-FORMAT).")
@reports_errors
def convert(path: Path, format_: str, out: Path | None) -> None:
    """Copy a store into another format (streamed, block by block)."""
    out = out or as_path(f"{str(path).rstrip('/')}-{format_}")
    written = convert_store(path, out, format_)
    _console().print(f"wrote {written} ({format_})", markup=False)


@main.command()
@click.option("--law", type=click.Choice(LAWS), default=LAWS[0], show_default=True)
@click.option("--root", default="shards", show_default=True, type=PATH_OR_URL)
@click.option("--n", default=20000, show_default=True)
@click.option("--src-dim", default=16, show_default=True)
@click.option("--dst-dim", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--format", "format_", default=FORMATS[0], show_default=True, help=FORMAT_HELP)
@reports_errors
def synth(law: str, root: Path, n: int, src_dim: int, dst_dim: int, seed: int, format_: str) -> None:
    """Write a synthetic source/target store pair with a known law, and a view of them."""
    from n2n.shards.synthetic import write_synthetic

    view = write_synthetic(
        root=root, law=law, n=n, src_dim=src_dim, dst_dim=dst_dim, seed=seed, format=format_
    )
    _console().print(f"view {view}", markup=False)
