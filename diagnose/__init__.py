"""Diagnose an expert: translate each of its layers into a decoder's images and measure what each keeps.

``n2n.diagnose(expert, layers, decoder, data, ...)`` calls ``n2n.diagnose.api.diagnose``: the package is
callable, so the API name and the package name are the same word (as ``n2n.evaluate``).
"""

import sys
import types


class _Callable(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from n2n.diagnose.api import diagnose

        return diagnose(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable
