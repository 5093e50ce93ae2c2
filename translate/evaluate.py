"""Deprecated: moved to ``n2n.evaluate`` (the API in ``n2n.evaluate.api``, n2n-eval in ``n2n.evaluate.cli``).
This name stays importable, with a DeprecationWarning."""

import warnings

from n2n.evaluate.api import *  # noqa: F403
from n2n.evaluate.api import __all__ as _api
from n2n.evaluate.cli import main, print_report  # noqa: F401

__all__ = [*_api, "main", "print_report"]
warnings.warn("n2n.translate.evaluate is deprecated: import n2n.evaluate.api (n2n-eval: n2n.evaluate.cli)",
              DeprecationWarning, stacklevel=2)
