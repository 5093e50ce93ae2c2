"""What every n2n command shares: its console, the path-or-URL type, and one way to fail.

A command is a thin call of the API. The API raises ``N2NError`` (and its subclasses) for anything
the user can fix; ``reports_errors`` turns that into one line, ``error: <message>``, and the
error's exit status (2, or 1 for a run that diverged), so no command hand-writes an ``except``.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from n2n.errors import N2NError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def console() -> Console:
    """The console for progress and errors (stderr); made per call so tests' captured streams are used."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` on one line and exit with ``code``."""
    console().print(f"[red]error:[/] {escape(message)}")
    sys.exit(code)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a click callback: an N2NError becomes its one-line message and exit status."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except N2NError as err:
            fail(str(err).strip().replace("\n", " "), getattr(err, "exit_code", 2))

    return wrapper


class PathOrURL(click.ParamType):
    """A local path, or an fsspec URL (s3://bucket/shards/..., memory://...) for stores and views."""

    name = "path"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 (click's signature)
        from n2n.files import as_path

        return as_path(value)


PATH_OR_URL = PathOrURL()


# The umbrella command's sub-commands, as "module:command": each module is imported when its command runs, so
# that this module, which every command imports for the helpers above, imports none of them.
COMMANDS = {"serve": "n2n.translate.serve:main"}


class Commands(click.Group):
    """A click group whose commands are imported on first use (``COMMANDS``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attribute = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=Commands, context_settings=CONTEXT)
def main() -> None:
    """n2n's umbrella command: ``n2n serve`` (the stages are n2n-extract, n2n-shards, n2n-train, n2n-translate,
    n2n-eval; n2n-diagnose diagnoses an expert)."""
