"""n2n-shards: list, inspect, verify, pair and convert latent stores.

Every user error (a wrong path, a damaged store) is a StoreError: it is printed as one line,
``error: <what and how to fix it>``, and the command exits with status 2, never with a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from n2n.shards.parts import commit_parts
from n2n.shards.store import FORMATS, META_NAME, Store, StoreError, as_path, convert_store, open_store, verify_store
from n2n.shards.view import VIEW_NAME, create_view, open_view, view_stores


class _Group(click.Group):
    """A click group that turns StoreError into a one-line message and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StoreError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


class PathOrURL(click.ParamType):
    """A local path, or an fsspec URL (s3://bucket/shards/..., memory://...) for stores and views."""

    name = "path"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 (click's signature)
        return as_path(value)


PATH_OR_URL = PathOrURL()


def _console() -> Console:
    # Made per command, so output goes to the stdout of the moment (click's test runner swaps it).
    return Console(highlight=False, soft_wrap=True)


def _require(path: Path) -> None:
    if not path.exists():
        raise StoreError(f"no latent store or view at {path}: run n2n-extract or check the path")


def _is_view(path: Path) -> bool:
    return (path / VIEW_NAME).is_file()


@click.group(cls=_Group)
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
        subdirs.sort()


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


def _view_row(path: Path, root: Path) -> str:
    try:
        source, target = view_stores(path)
    except StoreError as err:
        return f"[red]damaged[/red] {escape(str(err))}"
    return escape(f"{os.path.relpath(source, root)} -> {os.path.relpath(target, root)}")


@main.command()
@click.argument("path", type=PATH_OR_URL)
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
@click.option("--name", required=True, help="View name: the view is written to ROOT/NAME.")
@click.option("--root", default="shards", show_default=True, type=PATH_OR_URL)
def pair(source: Path, target: Path, name: str, root: Path) -> None:
    """Create a view that translates SOURCE store latents into TARGET store latents."""
    path = create_view(root / name, source, target)
    pairs = len(open_view(path).join())
    _console().print(f"view {path}: {pairs} pairs", markup=False)


@main.command()
@click.argument("path", type=PATH_OR_URL)
def commit(path: Path) -> None:
    """Join the parts of PATH written by several processes (PATH.parts/) into the store PATH.

    Rank 0 of a distributed n2n-extract does this itself once every rank is done; run it by hand
    where the ranks ran as separate jobs. Safe to repeat: a commit cut off is redone from the parts.
    """
    store = open_store(commit_parts(path))
    _console().print(f"committed {store.path}: {len(store)} rows, complete")


@main.command()
@click.argument("path", type=PATH_OR_URL)
@click.option("--format", "format_", required=True, type=click.Choice(FORMATS))
@click.option("--out", type=PATH_OR_URL, help="Destination (default: PATH-FORMAT).")
def convert(path: Path, format_: str, out: Path | None) -> None:
    """Copy a store into another format (streamed, block by block)."""
    out = out or as_path(f"{str(path).rstrip('/')}-{format_}")
    written = convert_store(path, out, format_)
    _console().print(f"wrote {written} ({format_})", markup=False)


@main.command()
@click.option("--law", type=click.Choice(["gaussian", "bimodal"]), default="gaussian", show_default=True)
@click.option("--root", default="shards", show_default=True, type=PATH_OR_URL)
@click.option("--n", default=20000, show_default=True)
@click.option("--src-dim", default=16, show_default=True)
@click.option("--dst-dim", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--format", "format_", type=click.Choice(FORMATS), default="zarr", show_default=True)
def synth(law: str, root: Path, n: int, src_dim: int, dst_dim: int, seed: int, format_: str) -> None:
    """Write a synthetic source/target store pair with a known law, and a view of them."""
    from n2n.shards.synthetic import write_synthetic

    view = write_synthetic(
        root=root, law=law, n=n, src_dim=src_dim, dst_dim=dst_dim, seed=seed, format=format_
    )
    _console().print(f"view {view}", markup=False)
