"""Settings declared once: a dataclass field carries its default, help text and allowed range.

Every concept has one config dataclass (``ExtractConfig``, ``FlowConfig``, ``TrainConfig``, ...)
whose fields are made with ``setting``. The same declaration then

- checks values where the work starts (``check_fields`` in the dataclass's ``__post_init__``), so
  the API and the CLI refuse ``batch_size=0`` with the same one-line message before anything is
  written, and
- becomes the command's click options (``click_options``), so adding an option is one field.

Ranges are checked here, not by click, so both front doors say the same thing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from n2n.errors import N2NError


def setting(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
            max: float | None = None, above: float | None = None, below: float | None = None,
            choices: Sequence[str] | None = None, default_factory: Any = dataclasses.MISSING,
            cli: bool = True) -> Any:
    """A dataclass field with its help and range: ``min``/``max`` inclusive, ``above``/``below`` strict.

    ``cli=False`` keeps a field out of the generated click options (set by code, not by users).
    """
    meta = {"help": help, "min": min, "max": max, "above": above, "below": below,
            "choices": tuple(choices) if choices else None, "cli": cli}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"n2n": meta})


def flag(name: str) -> str:
    """The command-line spelling of a field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def check_value(name: str, value: Any, *, integer: bool = False, min: float | None = None,
                max: float | None = None, above: float | None = None, below: float | None = None,
                choices: Sequence[str] | None = None, optional: bool = False) -> None:
    """Raise N2NError naming ``name`` (and its flag) unless ``value`` is of the type and in the range."""
    if value is None and optional:
        return
    rule = _rule(integer, min, max, above, below, choices)
    where = f"{name} ({flag(name)}) = {value!r}"
    if choices is not None:
        if value not in choices:
            raise N2NError(f"{where}: {rule}")
        return
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too
    if not number or not math.isfinite(value) or (integer and not float(value).is_integer()):
        raise N2NError(f"{where}: {rule}")
    if ((min is not None and value < min) or (max is not None and value > max)
            or (above is not None and value <= above) or (below is not None and value >= below)):
        raise N2NError(f"{where}: {rule}")


def _rule(integer: bool, lo: float | None, hi: float | None, above: float | None, below: float | None,
          choices: Sequence[str] | None) -> str:
    if choices is not None:
        return f"must be one of {', '.join(map(str, choices))}"
    parts = [f">= {lo:g}" if lo is not None else "", f"> {above:g}" if above is not None else "",
             f"<= {hi:g}" if hi is not None else "", f"< {below:g}" if below is not None else ""]
    bounds = " and ".join(p for p in parts if p)
    kind = "an integer" if integer else "a number"
    return f"must be {kind}{' ' + bounds if bounds else ''}"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of an annotation like ``int | None``."""
    args = typing.get_args(hint)
    if args and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return inner, True
    return hint, False


def check_fields(obj: Any) -> None:
    """Check every ``setting`` field of a dataclass instance against its declared type and range.

    A number that passes is stored as the field's own type (``np.int64(5)`` or ``5.0`` as ``5``), so a
    config always serialises to JSON (checkpoint headers, store meta) and compares equal to its copy.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        meta = f.metadata.get("n2n")
        if meta is None:
            continue
        kind, optional = _base(hints[f.name])
        value = getattr(obj, f.name)
        if meta["choices"] is not None:
            check_value(f.name, value, choices=meta["choices"], optional=optional)
        elif kind in (int, float):
            check_value(f.name, value, integer=kind is int, min=meta["min"], max=meta["max"], above=meta["above"],
                        below=meta["below"], optional=optional)
            if value is not None:
                object.__setattr__(obj, f.name, kind(value))  # frozen dataclasses too


def click_options(cls: type, skip: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Decorate a click command with one option per ``setting`` field of ``cls`` (in field order).

    Defaults come from the dataclass; a ``None`` default shows the field's help text instead.
    Ranges are not given to click: the dataclass checks them, with the API's message. click is
    imported here, so that a module declaring its settings (``n2n.cinn``) does not need it.
    """
    import click

    hints = _hints(cls)

    def decorate(command: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            meta = f.metadata.get("n2n")
            if meta is None or not meta["cli"] or f.name in skip:
                continue
            kind, _ = _base(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            names = [flag(f.name)]
            kwargs: dict[str, Any] = {"default": default, "help": meta["help"], "show_default": default is not None}
            if kind is bool:
                names = [f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"]
            elif meta["choices"] is not None:
                kwargs["type"] = click.Choice(meta["choices"])
            elif kind is Path:
                kwargs["type"] = click.Path(path_type=Path)
            else:
                kwargs["type"] = kind
            command = click.option(*names, f.name, **kwargs)(command)
        return command

    return decorate


def from_params(cls: type, params: dict[str, Any], **extra: Any) -> Any:
    """An instance of ``cls`` from the click parameters that name its fields (checked on creation)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in names}, **extra)


def split_options(options: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """API keyword arguments divided among config classes by field name; an unknown name is an N2NError
    that lists the accepted ones."""
    out: list[dict[str, Any]] = [{} for _ in classes]
    for name, value in options.items():
        for i, cls in enumerate(classes):
            if name in {f.name for f in dataclasses.fields(cls)}:
                out[i][name] = value
                break
        else:
            accepted = sorted(f.name for cls in classes for f in dataclasses.fields(cls)
                              if f.metadata.get("n2n", {}).get("cli", True))
            raise N2NError(f"unknown option {name!r}; the options are: {', '.join(accepted)}")
    return out
