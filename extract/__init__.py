"""Stage 1: run frozen experts once over datasets and cache their latents in stores.

``n2n.extract(expert, data, ...)`` calls ``n2n.extract.api.extract``: the package is callable, so
the API name and the package name are the same word without one hiding the other.
"""

import sys
import types


class _Callable(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from n2n.extract.api import extract

        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable
