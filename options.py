"""Settings declared once: a dataclass field carries its default, help text and allowed range.

Every concept has one config dataclass (``ExtractConfig``, ``FlowConfig``, ``TrainConfig``, ...)
whose fields are made with ``setting``. The same declaration then

- checks values where the work starts (``check_fields`` in the dataclass's ``__post_init__``), so
  the API and the CLI refuse ``batch_size=0`` with the same one-line message before anything is
  written, and
- becomes the command's click options (``click_options``), so adding an option is one field and a
  default cannot differ between the command and the API, and
- is what a config file sets: ``--config FILE.yaml`` on every command (``config_option``) and
  ``config=`` in the API (``read_config``) take the option names as keys, and every run and store
  writes the options it was made with, defaults included, as ``config.yaml`` (``write_config``).

Ranges are checked here, not by click, so both front doors say the same thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from n2n.errors import N2NError

CONFIG_FILE = "config.yaml"  # a run's or a store's options, written beside its data
RECORDED = ("n2n_version",)  # keys of a written config.yaml that are records, not options


def setting(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
            max: float | None = None, above: float | None = None, below: float | None = None,
            choices: Sequence[str] | None = None, default_factory: Any = dataclasses.MISSING,
            cli: bool = True, flag: str | None = None, metavar: str | None = None, url: bool = False) -> Any:
    """A dataclass field with its help and range: ``min``/``max`` inclusive, ``above``/``below`` strict.

    ``cli=False`` keeps a field out of the generated click options (set by code, not by users).
    ``flag`` spells the option otherwise than the field (``data_options`` -> ``--data-option``, repeated
    as KEY=VALUE); ``url``: a path that may also be an fsspec URL (``s3://...``), for stores and views.
    """
    meta = {"help": help, "min": min, "max": max, "above": above, "below": below,
            "choices": tuple(choices) if choices else None, "cli": cli, "flag": flag, "metavar": metavar,
            "url": url}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"n2n": meta})


def flag(name: str) -> str:
    """The command-line spelling of a field: batch_size -> --batch-size (one letter: n -> -n)."""
    return f"-{name}" if len(name) == 1 else "--" + name.replace("_", "-")


def option_name(key: str) -> str:
    """An option as a field name, however it is written: --batch-size, batch-size, batch_size -> batch_size."""
    return key.strip().lstrip("-").replace("-", "_")


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


def field_default(f: dataclasses.Field) -> Any:
    """A field's default (made by its factory where it has one); MISSING for a required field."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def click_options(cls: type, skip: Sequence[str] = (),
                  more_help: Mapping[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Decorate a click command with one option per ``setting`` field of ``cls`` (in field order).

    Defaults come from the dataclass (a field without one is a required option); a ``None`` default
    shows the field's help text instead. By the field's type: ``bool`` is a ``--x/--no-x`` pair, a
    ``dict`` a repeatable ``KEY=VALUE`` option, a list or tuple a comma-separated one, a ``Path`` a
    path (or a URL where the field says so). Ranges are not given to click: the dataclass checks them,
    with the API's message. click is imported here, so that a module declaring its settings
    (``n2n.cinn``) does not need it. ``more_help``: text to add to some options' help, known only when
    the command is built (the installed plug-ins).
    """
    import click

    hints = _hints(cls)

    def decorate(command: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            meta = f.metadata.get("n2n")
            if meta is None or not meta["cli"] or f.name in skip:
                continue
            kwargs = _option_kwargs(f, meta, hints[f.name])
            if more_help and f.name in more_help:
                kwargs["help"] = f"{kwargs['help']} {more_help[f.name]}".strip()
            command = click.option(*_option_names(f, meta, hints[f.name]), f.name, **kwargs)(command)
        return command

    return decorate


def _option_names(f: dataclasses.Field, meta: dict, hint: Any) -> list[str]:
    name = meta["flag"] or flag(f.name)
    if _base(hint)[0] is bool:
        return [f"{name}/--no-{name.lstrip('-')}"]
    return [name]


def _option_kwargs(f: dataclasses.Field, meta: dict, hint: Any) -> dict[str, Any]:
    import click

    kind, _ = _base(hint)
    default = field_default(f)
    required = default is dataclasses.MISSING
    origin = typing.get_origin(kind) or kind
    kwargs: dict[str, Any] = {"help": meta["help"], "required": required}
    if origin is dict:
        option = meta["flag"] or flag(f.name)
        kwargs |= {"multiple": True, "metavar": meta["metavar"] or "KEY=VALUE", "callback": _key_values(option)}
        return kwargs
    kwargs |= {"default": None if required else default, "show_default": not required and default is not None}
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if kind is bool:
        return kwargs
    if meta["choices"] is not None:
        kwargs["type"] = click.Choice(meta["choices"])
    elif kind is Path:
        from n2n.cli import PATH_OR_URL

        kwargs["type"] = PATH_OR_URL if meta["url"] else click.Path(path_type=Path)
    elif origin in (list, tuple):
        (item, *_) = typing.get_args(kind) or (str,)
        kwargs["type"] = Listed(item, origin)
        if default is not None and not required:
            kwargs["default"] = ",".join(map(str, default))
    else:
        kwargs["type"] = kind
    return kwargs


def _key_values(option: str) -> Callable:
    """The click callback of a repeatable KEY=VALUE option: the values as a dict, or a one-line error."""

    def parse(ctx: Any, param: Any, value: Sequence[str]) -> dict[str, Any]:
        try:
            return dict(parse_option(text, option) for text in value)
        except N2NError as err:
            from n2n.cli import fail

            fail(str(err))

    return parse


@functools.cache
def _listed_type() -> type:
    import click

    class Listed(click.ParamType):
        """Comma-separated values (``--layers cls,mean``, ``--channels 16,32``); a list from a config file."""

        name = "list"

        def __init__(self, item: type, container: type) -> None:
            self.item, self.container = item, container

        def convert(self, value: Any, param: Any, ctx: Any) -> Any:
            if value is None or isinstance(value, self.container) and not isinstance(value, str):
                parts = value
            else:
                parts = [part for part in str(value).split(",") if part.strip()]
            try:
                return self.container(self.item(part.strip() if isinstance(part, str) else part) for part in parts)
            except (TypeError, ValueError):
                from n2n.cli import fail

                kind = "integers, e.g. 16,32,64" if self.item is int else f"{self.item.__name__} values"
                fail(f"{param.opts[0] if param else 'value'} {value!r}: write comma-separated {kind}")

    return Listed


def Listed(item: type, container: type) -> Any:  # noqa: N802 (a click type, made where click is imported)
    return _listed_type()(item, container)


def parse_option(text: str, option: str) -> tuple[str, object]:
    """KEY=VALUE (a ``--data-option``) with VALUE as an int, a float, true/false, or else the string itself."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise N2NError(f"{option} {text!r}: write it as KEY=VALUE, e.g. seed=1")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def from_params(cls: type, params: dict[str, Any], **extra: Any) -> Any:
    """An instance of ``cls`` from the click parameters that name its fields (checked on creation)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in names}, **extra)


# ---------------------------------------------------------------- config files


def read_config(path: str | Path) -> dict[str, Any]:
    """The options in a YAML file: a mapping of option names (``batch_size`` or ``batch-size``) to values.
    A ``config.yaml`` that a run or store wrote reads back as it is (its records, like the n2n version,
    are left out). Anything else is an N2NError naming the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise N2NError(f"config {path}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise N2NError(f"config {path}: not YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise N2NError(f"config {path}: write a mapping of option names to values, e.g. 'steps: 2000'")
    for recognise, convert in CONFIG_DIALECTS:  # another project's config, as it ships (net2net's)
        if recognise(data):
            return convert(data, path)
    options = {option_name(key): value for key, value in data.items()}
    return {key: value for key, value in options.items() if key not in RECORDED}


# Config files in another project's format, read as n2n's options: (recognise, convert) pairs, each
# registered by the module that knows its format (cinn.net2net: net2net's translation YAML, registered on
# ``import n2n.cinn``, which every command and API function that trains imports), so that this generic
# reader imports no model code.
CONFIG_DIALECTS: list[tuple[Callable[[Mapping[str, Any]], bool], Callable[[Mapping[str, Any], Path], dict]]] = []


def register_config_dialect(recognise: Callable[[Mapping[str, Any]], bool],
                            convert: Callable[[Mapping[str, Any], Path], dict]) -> None:
    """Read config files that ``recognise`` accepts through ``convert(data, path)`` (``read_config``)."""
    CONFIG_DIALECTS.append((recognise, convert))


def check_names(given: Iterable[str], known: Iterable[str], where: str) -> None:
    """N2NError for the first name in ``given`` that is not ``known``, with the closest known one."""
    known = sorted(known)
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the options are: {', '.join(known)}"
            raise N2NError(f"{where}: unknown option {name!r}; {hint}")


def with_config(config: str | Path | None, options: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """The API's keyword ``options`` over the values of the ``config`` file (if one is given), each name
    checked against ``known``."""
    values = read_config(config) if config is not None else {}
    check_names(values, known, f"config {config}")
    return {**values, **options}


def load_options(config: str | Path | None, given: Mapping[str, Any], *classes: type,
                 own: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An API function's options, read one way by every function as its command reads them: the values of the
    ``config`` file, then the keywords ``given`` over them (a keyword left at None keeps the file's value).
    Each name is checked against the fields of ``classes`` and the function's ``own`` options (name ->
    default); an unknown one is an N2NError naming the closest. Returns the function's own options, defaults
    filled in, and the values of each class's fields, to build it with (``split_options``)."""
    own = dict(own or {})
    known = [*own, *(f.name for cls in classes for f in dataclasses.fields(cls))]
    merged = with_config(config, {name: value for name, value in given.items() if value is not None}, known)
    mine = {name: merged.pop(name, default) for name, default in own.items()}
    return mine, split_options(merged, *classes)


def config_option(command: Callable) -> Callable:
    """Decorate a click command with ``--config FILE.yaml``: the file's values become the defaults of the
    command's options, so the command line overrides the file. Keys are checked against the command's
    own options (an unknown one is a one-line error naming the closest), values as the options' are."""
    import click

    def load(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
        if value is None or ctx.resilient_parsing:
            return value
        from n2n.cli import fail

        params = {}  # by name and by flag: "shards" is the option --shards (dest view), "data_option" --data-option
        for p in ctx.command.params:
            if p.name and p.name != "config" and isinstance(p, click.Option):
                params[p.name] = p
                for opt in p.opts:
                    params.setdefault(option_name(opt), p)
        try:
            values = read_config(value)
            check_names(values, params, f"--config {value}")
        except N2NError as err:
            fail(str(err))
        defaults = {params[k].name: _as_flag_value(params[k], v) for k, v in values.items()}
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    return click.option("--config", type=click.Path(path_type=Path, dir_okay=False), is_eager=True,
                        expose_value=False, callback=load,
                        help="A YAML file of options (keys as here, batch_size or batch-size); the command line "
                             "overrides it. A run's or store's own config.yaml repeats it.")(command)


def _as_flag_value(param: Any, value: Any) -> Any:
    """A config file's value as the option would be given on the command line (a mapping as KEY=VALUE)."""
    if getattr(param, "multiple", False) and isinstance(value, dict):
        return [f"{key}={item}" for key, item in value.items()]
    return value


def as_written(value: Any) -> Any:
    """An option's value as YAML writes it: paths as text, tuples as lists."""
    if isinstance(value, Path) or type(value).__module__.startswith("upath"):
        return str(value)
    if isinstance(value, tuple | list):
        return [as_written(item) for item in value]
    if isinstance(value, dict):
        return {key: as_written(item) for key, item in value.items()}
    return value


def config_text(options: Mapping[str, Any]) -> str:
    """``config.yaml``'s text: every option with its value, in the order given, then the n2n version."""
    import yaml

    from n2n import __version__

    body = {key: as_written(value) for key, value in options.items()} | {"n2n_version": __version__}
    return yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


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
