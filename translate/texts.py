"""Deprecated: moved to ``n2n.evaluate.texts``. This name stays importable (with a DeprecationWarning) and is that
module itself."""

import importlib
import sys
import warnings

warnings.warn("n2n.translate.texts is deprecated: import n2n.evaluate.texts", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("n2n.evaluate.texts")
