"""n2n: network-to-network translation between the cached latents of frozen expert models.

The whole method from a notebook (the commands n2n-extract, n2n-shards pair, n2n-train,
n2n-translate and n2n-eval are thin wrappers over these same functions)::

    import n2n
    src = n2n.extract("minilm", "shapes", limit=2000)                 # a Store (path, count, dim, ...)
    dst = n2n.extract("ae:experts/ae-shapes", "shapes", limit=2000)
    view = n2n.pair(src, dst, name="minilm_ae")                        # a View
    run = n2n.train(view, out="runs/minilm_ae", steps=2000)            # the run folder
    t = n2n.Translator.load(run)                                       # both experts rebuilt from the run
    latents = t.sample(["a red circle"], n=8)                          # [1, 8, dim] target latents
    images = t.translate(["a red circle"], n=8)                        # [1, 8, 3, H, W] in [0, 1]
    scores = n2n.evaluate(run)                                         # the dict n2n-eval writes

Bring your own experts, datasets and store formats: subclass ``n2n.Expert`` / ``n2n.ItemDataset``
(or implement ``n2n.shards.backend.Backend``) and declare an entry point in your distribution
(groups ``n2n.experts``, ``n2n.datasets``, ``n2n.formats``), or call ``n2n.register_expert`` /
``register_dataset`` / ``register_format`` in the running process.

Every error a user can fix is an ``n2n.N2NError`` with a one-line message. Names are imported on
first use, so ``import n2n`` is cheap.

Latents do not depend on the thread count: ``import n2n`` puts MKL, which multiplies torch's float
matrices on x86 CPUs, in its strict reproducible mode (``MKL_CBWR=AUTO,STRICT``), unless ``MKL_CBWR``
is set already. Without it, MKL blocks a product's sums by the number of threads, and the same batch
through the same expert gave latents differing in the last bits between a one-process extraction
(every core) and each rank of ``--nproc 2`` (fewer threads each), measured on an Intel Xeon (MiniLM,
batches of 1 and 4..12 captions). Intel documents the strict mode as bitwise reproducible across thread
counts for GEMMs on its AVX2 and AVX-512 code paths; ``python -m bench.reproducible`` measures its cost.
MKL reads the mode at its first product, so in a notebook import n2n before torch computes anything
(importing torch is fine). torch builds without MKL (aarch64, macOS) are not affected.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from n2n.errors import N2NError

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# public name -> "module:attribute", imported when first asked for. n2n.extract and n2n.train are
# the stage packages themselves, made callable (see their __init__), so the name is one thing.
_API = {
    "extract": "n2n.extract",
    "pair": "n2n.shards.view:pair",
    "train": "n2n.train",
    "Translator": "n2n.translate.pipeline:Translator",
    "evaluate": "n2n.evaluate",
    "diagnose": "n2n.diagnose",
    "Store": "n2n.shards:Store",
    "View": "n2n.shards:View",
    "open_store": "n2n.shards:open_store",
    "open_view": "n2n.shards:open_view",
    "Expert": "n2n.extract.experts:Expert",
    "load_expert": "n2n.extract.experts:load_expert",
    "ItemDataset": "n2n.extract.datasets:ItemDataset",
    "open_dataset": "n2n.extract.datasets:open_dataset",
    "FlowConfig": "n2n.cinn:FlowConfig",
    "register_expert": "n2n.plugins:register_expert",
    "register_dataset": "n2n.plugins:register_dataset",
    "register_format": "n2n.plugins:register_format",
}

__all__ = ["N2NError", *_API]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'n2n' has no attribute {name!r}")
    module, _, attr = _API[name].partition(":")
    value = importlib.import_module(module)
    value = getattr(value, attr) if attr else value
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
