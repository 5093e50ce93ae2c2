"""Stage 2: fit the cINN from a view of two latent stores alone.

``n2n.train(view, ...)`` calls ``n2n.train.api.train``: the package is callable, so the API name
and the package name are the same word without one hiding the other.
"""

import sys
import types


class _Callable(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from n2n.train.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable
