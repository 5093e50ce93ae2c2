"""The errors of latent stores: each one line, naming the store (or plug-in) and the way on."""

from n2n.errors import N2NError
from n2n.plugins import PluginError


class StoreError(N2NError):
    """A store is missing, damaged or misused; the message names the path and what to do."""


class StoreWriteError(StoreError, OSError):
    """A write failed (a full disk: errno ENOSPC); the committed rows stay and the store resumes."""

    def __str__(self) -> str:
        return self.strerror  # the message alone, as every StoreError reads


class FormatError(StoreError, PluginError):
    """A store format plug-in that cannot be used (fails to import, is claimed twice, is no ``Backend``).

    Both a StoreError (every reader of stores handles those) and a PluginError (what every broken plug-in
    raises); the message names the distribution and the entry point.
    """
