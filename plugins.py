"""Plug-ins: the experts, datasets and store formats n2n can use, found in one way.

Each kind is an entry-point group. An installed distribution that declares, in its pyproject.toml,

    [project.entry-points."n2n.experts"]
    myenc = "mypkg.experts:load"

makes the expert spec ``myenc[:model][@layer]`` work everywhere a built-in family works. n2n's own
families, datasets and formats are declared the same way in n2n's pyproject.toml, so there is one
path, not two. In a running process (a notebook), ``register(kind, name, obj)`` adds one more
(``n2n.register_expert`` / ``register_dataset`` / ``register_format`` call it).

What each kind's object must be is that kind's contract, checked where it is used:
- ``n2n.experts``: ``load(model: str | None, layer: str | None, weights: str | None) -> n2n.Expert``
- ``n2n.datasets``: a subclass of ``n2n.ItemDataset``, built as ``cls(root, split, **options)``
- ``n2n.formats``: a class implementing ``n2n.shards.backend.Backend``

A plug-in that fails to import, or a name that two distributions both claim, is a ``PluginError``
naming the distribution and the entry point, raised when that name is used: one broken plug-in
does not stop the others.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from n2n.errors import N2NError

GROUPS = {"expert": "n2n.experts", "dataset": "n2n.datasets", "format": "n2n.formats"}
IN_PROCESS = "(registered in this process)"  # the "distribution" of what register() adds


class PluginError(N2NError):
    """A plug-in that cannot be used; the message names its distribution and entry point."""


@dataclass(frozen=True)
class Plugin:
    """One named provider of a kind: where it comes from, and how to get its object."""

    kind: str
    name: str
    dist: str  # "n2n 0.1.0", "mypkg 0.2", or IN_PROCESS
    target: str  # the entry point's "module:attr", or the object's qualified name
    get: Callable[[], object]

    @property
    def provider(self) -> str:
        """The distribution's name without its version, or "this process"."""
        return "this process" if self.dist == IN_PROCESS else self.dist.split()[0]

    @property
    def where(self) -> str:
        return f"entry point {self.name} = {self.target!r} of {self.dist}"

    def load(self) -> object:
        """The plug-in's object; an import failure becomes a PluginError naming the distribution."""
        try:
            return self.get()
        except Exception as err:  # whatever the plug-in's import raises
            raise PluginError(f"{self.kind} plug-in {self.name!r} failed to load ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}) from {self.where}; "
                              f"fix {'it' if self.dist == IN_PROCESS else 'or uninstall ' + self.provider}"
                              ) from err


_registered: dict[str, dict[str, Plugin]] = {kind: {} for kind in GROUPS}


def _installed(kind: str) -> dict[str, list[Plugin]]:
    """Entry points of one group, by name (a name may be claimed by several distributions)."""
    return {name: list(claims) for name, claims in _scan(GROUPS[kind], tuple(sys.path)).items()}


@functools.lru_cache(maxsize=64)
def _scan(group: str, path: tuple[str, ...]) -> dict[str, tuple[Plugin, ...]]:
    """Scanning the installed distributions takes ~20 ms: once per group and ``sys.path`` (a changed
    path, e.g. a plug-in folder added in a notebook or a test, is scanned anew)."""
    kind = next(k for k, g in GROUPS.items() if g == group)
    found: dict[str, list[Plugin]] = {}
    for ep in entry_points(group=group):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unknown distribution"
        found.setdefault(ep.name, []).append(Plugin(kind, ep.name, dist, ep.value, ep.load))
    return {name: tuple(claims) for name, claims in found.items()}


def plugins(kind: str) -> dict[str, list[Plugin]]:
    """Every provider of ``kind`` by name: installed entry points, then those registered in-process."""
    found = _installed(kind)
    for name, plugin in _registered[kind].items():
        found.setdefault(name, []).append(plugin)
    return dict(sorted(found.items()))


def names(kind: str) -> list[str]:
    """The names a user may give for ``kind``, sorted."""
    return list(plugins(kind))


def find(kind: str, name: str) -> Plugin | None:
    """The one provider of ``name``; None if there is none, PluginError if several claim it."""
    claims = plugins(kind).get(name, [])
    if len(claims) > 1:
        raise PluginError(f"{kind} {name!r} is claimed twice: by the {claims[0].where} and by the "
                          f"{claims[1].where}; rename one of the entry points or uninstall one distribution")
    return claims[0] if claims else None


def register(kind: str, name: str, obj: object) -> None:
    """Make ``name`` mean ``obj`` for ``kind`` in this process; a name already in use is refused."""
    if kind not in GROUPS:
        raise PluginError(f"no plug-in kind {kind!r}; kinds: {', '.join(GROUPS)}")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise PluginError(f"{kind} name {name!r}: use letters, digits, '-' and '_' only")
    taken = plugins(kind).get(name)
    if taken:
        raise PluginError(f"{kind} {name!r} is already provided by the {taken[0].where}; choose another name")
    target = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    _registered[kind][name] = Plugin(kind, name, IN_PROCESS, target, lambda: obj)


def unregister(kind: str, name: str) -> None:
    """Forget an in-process registration (tests, notebooks that redefine a plug-in)."""
    _registered[kind].pop(name, None)


def register_expert(name: str, load: Callable) -> None:
    """Make the expert spec ``name[:model][@layer]`` call ``load(model, layer, weights) -> n2n.Expert``
    in this process (a notebook's own expert); installed plug-ins use the ``n2n.experts`` entry points."""
    register("expert", name, load)


def register_dataset(name: str, cls: type) -> None:
    """Make ``--data name`` open ``cls(root, split, **options)``, a subclass of ``n2n.ItemDataset``."""
    register("dataset", name, cls)


def register_format(name: str, cls: type) -> None:
    """Make ``format=name`` write and read stores through ``cls``, an ``n2n.shards.backend.Backend``."""
    register("format", name, cls)


def listing(kind: str) -> str:
    """``name (distribution), ...`` for help texts and ``n2n-shards ls``."""
    return ", ".join(f"{name} ({claims[0].provider})" if len(claims) == 1 else f"{name} (conflict)"
                     for name, claims in plugins(kind).items())
