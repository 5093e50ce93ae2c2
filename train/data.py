"""A view's latents as training rows: standardised on demand, split into train and held-out by key.

The whole point of stage 2 is that training touches nothing but these arrays: both stores'
latents are loaded once in their stored dtype and moved to the device with the join's row
indices, and every batch is an index gather there, converted and standardised as it is drawn.
``Pairs`` is what the trainer asks of them; ``PairedLatents`` (here) and ``train.stream``'s
``StreamedPairs``, for views larger than the device, each answer it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from n2n.parallel import ONE_PROCESS, Ranks
from n2n.shards import Store, StoreError
from n2n.shards.view import Join, View, hash_keys, open_view


@dataclass
class Standardizer:
    """Per-dimension affine map to zero mean, unit variance; kept in the checkpoint so that
    translation maps a new source latent exactly as training did. A dimension constant over the
    training rows is only centred (std 1): dividing by ~0 would blow any new value in it up."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, blocks: Iterable[torch.Tensor]) -> Standardizer:
        """Statistics of all rows of the blocks, merged block by block (Chan et al.'s pairwise
        update): one pass over a view too large to copy, each block read while in cache. A block's
        sums are float32 (pairwise, so accurate over a few thousand rows), their merge float64."""
        count, mean, m2 = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for block in blocks:
            n = len(block)
            block_mean = block.mean(0)
            block_m2 = (block - block_mean).square_().sum(0).double()
            delta, total = block_mean.double() - mean, count + n
            mean = mean + delta * (n / total)
            m2 = m2 + block_m2 + delta.square() * (count * n / total)
            count = total
        std = (m2 / count).sqrt().float()
        return cls(mean.float(), torch.where(std < 1e-6, torch.ones_like(std), std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def to(self, device: torch.device) -> Standardizer:
        return Standardizer(self.mean.to(device), self.std.to(device))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std.to(y.device) + self.mean.to(y.device)

    @property
    def log_abs_det(self) -> float:
        """log|det| of the inverse map: add it to an NLL of standardised latents to get the NLL of
        the latents in their stored units."""
        return float(self.std.double().log().sum())


class Rows:
    """Standardised float32 training rows of one side of a view: ``rows[i]`` is
    ``norm(latents[index[i]])``, computed when asked for.

    Why not a standardised float32 copy of the joined rows: the join repeats target rows (five
    captions per image), float32 doubles float16, and writing that copy of a 1M-caption view is
    2.5 GB of fresh memory (seconds here) held on the device all run. A batch costs one gather,
    one conversion and the standardisation instead (the statistics kept on the rows' device, so
    that no batch waits on a host-to-device copy).
    """

    def __init__(self, latents: torch.Tensor, index: torch.Tensor, norm: Standardizer):
        self.latents, self.index, self.norm = latents, index, norm.to(latents.device)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.index), self.latents.shape[1]

    @property
    def device(self) -> torch.device:
        return self.latents.device

    def __getitem__(self, i: int | slice | np.ndarray | torch.Tensor) -> torch.Tensor:
        rows = self.index[torch.as_tensor(i) if isinstance(i, np.ndarray) else i]
        return self.norm(self.latents[rows].float())

    def to(self, device: torch.device, latents: torch.Tensor | None = None) -> Rows:
        """On `device`; pass the side's latents already moved so that train and held-out rows share them."""
        return Rows(self.latents.to(device) if latents is None else latents, self.index.to(device), self.norm)


def rank_batch(target: Rows, source: Rows, idx: torch.Tensor, generator: torch.Generator, noise: float,
               ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch ``idx`` as (target, source) rows. The target noise is
    drawn for the whole global batch, so that the batch is the same for any number of processes."""
    size = len(idx)
    part = slice(ranks.rank * size // ranks.world, (ranks.rank + 1) * size // ranks.world)
    x = target[idx[part]]
    if noise:
        x = x + noise * torch.randn((size, x.shape[1]), device=x.device, generator=generator)[part]
    return x, source[idx[part]]


class Pairs(Protocol):
    """A view's pairs as the trainer uses them: held on the device (``PairedLatents``) or streamed
    from the stores (``train.stream.StreamedPairs``). The trainer never asks which."""

    view: View
    source_norm: Standardizer
    target_norm: Standardizer
    held_source: Rows  # the held-out pairs, for evaluation
    held_target: Rows
    truth: dict | None

    @property
    def dims(self) -> tuple[int, int]: ...

    @property
    def train_pairs(self) -> int: ...

    def batch(self, size: int, generator: torch.Generator, noise: float = 0.0,
              ranks: Ranks = ONE_PROCESS) -> tuple[torch.Tensor, torch.Tensor]:
        """A random (target, source) training batch; under torchrun, this rank's slice of the global
        batch (every rank draws the same indices and noise)."""

    def close(self) -> None:
        """Release what reading the pairs holds (a stream's reader thread)."""


@dataclass(kw_only=True)
class ViewSplit:
    """What both kinds of ``Pairs`` share: the view, its standardisation and its held-out pairs."""

    view: View | None
    source_norm: Standardizer
    target_norm: Standardizer
    held_source: Rows
    held_target: Rows
    truth: dict | None = None  # truth.json of a synthetic view: the analytic NLL
    held_key: np.ndarray | None = None  # key of each held-out pair (for evaluation against ground truth)
    held_rows: tuple[np.ndarray, np.ndarray] | None = None  # (source row, target row) of each held-out pair

    @property
    def dims(self) -> tuple[int, int]:
        """(source, target) latent sizes."""
        return len(self.source_norm.mean), len(self.target_norm.mean)


ARRAYS = ("source", "target", "held_source", "held_target")


@dataclass(kw_only=True)
class PairedLatents(ViewSplit):
    """A view's pairs held whole on one device: a batch is one index gather there (``Pairs``)."""

    source: Rows
    target: Rows

    @property
    def train_pairs(self) -> int:
        return len(self.target)

    def batch(self, size: int, generator: torch.Generator, noise: float = 0.0,
              ranks: Ranks = ONE_PROCESS) -> tuple[torch.Tensor, torch.Tensor]:
        """With replacement: ``torch.randint`` on the device, then the gather (see ``Pairs.batch``)."""
        idx = torch.randint(len(self.target), (size,), device=self.target.device, generator=generator)
        return rank_batch(self.target, self.source, idx, generator, noise, ranks)

    def close(self) -> None:
        """Nothing to release: the arrays go with the object."""

    def to(self, device: torch.device) -> PairedLatents:
        """Move the arrays to the device (n2n-train streams a view that would not fit: fits_in_memory)."""
        sides = {"source": self.source.latents, "target": self.target.latents}
        moved = {side: x.to(device) for side, x in sides.items()}
        rows = {k: getattr(self, k).to(device, moved[k.removeprefix("held_")]) for k in ARRAYS}
        return PairedLatents(view=self.view, **rows, source_norm=self.source_norm, target_norm=self.target_norm,
                             truth=self.truth, held_key=self.held_key, held_rows=self.held_rows)


def heldout_mask(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Rows whose key hashes into the held-out fraction. Deterministic from the key alone (not the
    row order, not the seed), so every caption of one image lands on the same side, and the split
    is the same for every run and every translation task over the same items."""
    return hash_keys(keys) % np.uint64(10_000) < round(fraction * 10_000)


BLOCK_ROWS = 8192  # rows per pass over a view: a few MB, so each block is read while in cache


def _blocks(latents: torch.Tensor, rows: np.ndarray) -> Iterator[torch.Tensor]:
    """float32 copies of latents[rows], a block at a time."""
    rows_ = torch.from_numpy(rows)
    for start in range(0, len(rows_), BLOCK_ROWS):
        yield latents[rows_[start : start + BLOCK_ROWS]].float()


def check_finite(store: Store, block: torch.Tensor, rows: torch.Tensor | np.ndarray | int) -> None:
    """Refuse a block of a store's latents holding NaN or inf (a broken expert or a corrupt file),
    naming the store row: ``rows`` holds each block row's store row, or is the first one's."""
    if torch.isfinite(block.sum()):  # any NaN or inf makes the sum one: a cheap test
        return
    bad_rows = (~torch.isfinite(block).all(1)).nonzero()
    if not len(bad_rows):  # finite values whose float32 sum overflowed
        return
    bad = int(bad_rows[0, 0])
    row = rows + bad if isinstance(rows, int) else int(rows[bad])
    raise StoreError(
        f"{store.path}: the latent of row {row} holds NaN or inf; check the store with "
        f"`n2n-shards verify {store.path}` and extract it again"
    )


def finite_latents(store: Store) -> torch.Tensor:
    """The store's latents as a tensor, refused when any is NaN or inf, naming the first such row."""
    latents = torch.from_numpy(store.latents())
    for start in range(0, len(latents), BLOCK_ROWS):
        check_finite(store, latents[start : start + BLOCK_ROWS].float(), start)
    return latents


def split_pairs(view_path: Path | str, holdout: float) -> tuple[View, Join, np.ndarray]:
    """Open a view, join its stores on key, and mark the held-out pairs (by key hash)."""
    view = open_view(view_path)
    join = view.join()
    held = heldout_mask(join.key, holdout)
    if held.all():
        raise StoreError(f"{view.path}: all {len(held)} pairs fall in the held-out split; lower --holdout")
    return view, join, held


def read_truth(view: View) -> dict | None:
    """truth.json of a synthetic view: the analytic NLL."""
    truth_file = view.path / "truth.json"
    return json.loads(truth_file.read_text()) if truth_file.exists() else None


def load_pairs(
    view_path: Path | str, holdout: float = 0.05, norms: tuple[Standardizer, Standardizer] | None = None
) -> PairedLatents:
    """Open a view, join its stores on key, split by key hash, and standardise: with the train rows'
    statistics, or with given (source, target) ones (a resumed run keeps its checkpoint's)."""
    view, join, held = split_pairs(view_path, holdout)
    latents = finite_latents(view.source), finite_latents(view.target)
    index = join.source_index, join.target_index
    norms = norms or tuple(Standardizer.fit(_blocks(x, rows[~held])) for x, rows in zip(latents, index, strict=True))
    rows = {f"{prefix}{side}": Rows(x, torch.from_numpy(i[mask]), norm)
            for prefix, mask in (("", ~held), ("held_", held))
            for side, x, i, norm in zip(("source", "target"), latents, index, norms, strict=True)}
    return PairedLatents(
        view=view,
        **rows,
        source_norm=norms[0],
        target_norm=norms[1],
        truth=read_truth(view),
        held_key=join.key[held],
        held_rows=(join.source_index[held], join.target_index[held]),
    )


def subsample(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted row indices [min(n, max_rows)] drawn without replacement, the same for the same seed:
    the metrics above are quadratic in rows, so a large view is scored on a fixed subset."""
    if n < 0 or max_rows < 0:
        raise ValueError(f"n and max_rows must be >= 0, got {n}, {max_rows}")
    if n <= max_rows:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False)).astype(np.int64)
