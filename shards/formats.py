"""Store formats by name: n2n's own and plug-ins, found the same way, through ``n2n.plugins``.

n2n declares its three formats as entry points of the ``n2n.formats`` group in its own
pyproject.toml, exactly as a plug-in distribution declares its own; ``n2n.register_format`` adds one
in a running process. A store records its format's name (and the distribution it came from) in
meta.json, so that a store written through a plug-in that is not installed here says what to install.
"""

from __future__ import annotations

from pathlib import Path

from n2n import plugins
from n2n.plugins import IN_PROCESS, PluginError
from n2n.shards.backend import Backend, missing_members
from n2n.shards.errors import FormatError, StoreError
from n2n.shards.meta import META_NAME

# n2n's own formats (its pyproject's n2n.formats entry points); zarr, the first, is the default.
FORMATS = ("zarr", "wds", "h5")


def format_names() -> list[str]:
    """Every format this process can write and read: n2n's own, installed plug-ins, registered ones."""
    return plugins.names("format")


def load_format(name: str, where: Path, recorded: str | None = None) -> tuple[type[Backend], str]:
    """The backend class of format ``name``, checked against ``Backend``, and the distribution it comes from.

    ``where`` is what an error names (the meta.json of a store being opened, the folder of one being
    created); ``recorded`` the distribution a store says wrote it, named where that format is missing.
    """
    try:
        plugin = plugins.find("format", name)
        cls = plugin.load() if plugin else None
    except PluginError as err:  # fails to import, or claimed twice: a StoreError too, for every reader
        raise FormatError(str(err)) from err
    if plugin is None:
        raise StoreError(f"{where}: unknown format {name!r} (installed: {', '.join(format_names())}): "
                         f"{_how_to_install(name, recorded)}")
    lacks = missing_members(cls)
    if lacks:
        fix = ("fix the class given to n2n.register_format" if plugin.dist == IN_PROCESS
               else f"fix or uninstall {plugin.dist.split()[0]}")
        raise FormatError(f"format plug-in {name!r} from the {plugin.where} is not a store backend: it lacks "
                          f"{', '.join(lacks)} (the protocol n2n.shards.backend.Backend): {fix}")
    return cls, plugin.dist  # type: ignore[return-value]  # checked against the protocol just above


def _how_to_install(name: str, recorded: str | None) -> str:
    if recorded == IN_PROCESS:
        return (f"the store was written through a format registered in its own process: register it here too, "
                f"n2n.register_format({name!r}, cls)")
    if recorded:
        return f"install {recorded.split()[0]} (the store was written through its plug-in, {recorded})"
    return f"install the distribution that declares the n2n.formats entry point {name!r}"


def backend_of(path: Path, meta: dict) -> type[Backend]:
    """The backend class of the store at ``path``, by the format its meta.json records."""
    return load_format(meta["format"], path / META_NAME, meta.get("format_dist"))[0]
