"""``n2n.extract``: one frozen expert over one dataset, once, into a latent store."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

from n2n.errors import N2NError
from n2n.extract.run import ExtractConfig, run_extraction
from n2n.options import load_options
from n2n.shards import Store, open_store


def extract(expert: str | None = None, data: str | None = None, *, config: str | os.PathLike | None = None,
            progress: bool = True, console: Console | None = None, **options: Any) -> Store:
    """Run ``expert`` (a spec ``name[:model][@layer]``) over dataset ``data`` and return its store.

    ``options`` are ``ExtractConfig``'s fields, named as n2n-extract's options: ``data_root``,
    ``split``, ``out`` (root of the stores, default ``shards``), ``format``, ``batch_size``,
    ``num_workers``, ``device``, ``dtype``, ``limit``, ``layers``, ``weights``, ``on_error``,
    ``overwrite``, ``commit_every``, ``data_options`` and ``expert_options`` (dicts: the
    dataset's and the expert family's own options, e.g. ``{"size": 64}``). Every one is checked before anything
    runs. A rerun resumes an interrupted store and returns a complete one as it is. With ``layers``,
    one store per layer is written beside the first, which is the one returned.
    Under torchrun every rank extracts its share and all ranks return the committed store.
    ``config``: a YAML file of the same options (``expert`` and ``data`` too), as n2n-extract's
    ``--config`` reads it; arguments override it. Each finished store writes its options to
    ``config.yaml``, so ``extract(config="shards/shapes/minilm/config.yaml")`` makes it again.
    """
    _, (settings,) = load_options(config, {"expert": expert, "data": data, **options}, ExtractConfig)
    for name in ("expert", "data"):
        if name not in settings:
            raise N2NError(f"no {name} to extract: give one ({name}=...), or a config file that names it")
    cfg = ExtractConfig(**settings)
    summary = run_extraction(cfg, console or Console(stderr=True, quiet=not progress))
    return open_store(summary["stores"][0])
