"""A view's joined latents as standardised tensors, split into train and held-out rows by key.

The whole point of stage 2 is that training touches nothing but these arrays: they are loaded
once, standardised, and moved to the device, where every batch is an index gather.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shards.store import Store, StoreError
from shards.view import View, open_view


@dataclass
class Standardizer:
    """Per-dimension affine map to zero mean, unit variance; kept in the checkpoint so that
    translation maps a new source latent exactly as training did. A dimension constant over the
    training rows is only centred (std 1): dividing by ~0 would blow any new value in it up."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardizer:
        # Two float32 passes (mean, then the mean square of the centred rows: accurate, since centred
        # first). numpy's float64 std copied the whole view twice: half the time to load 1M rows.
        mean = x.mean(0)
        std = (x - mean).square_().mean(0).sqrt_()
        return cls(mean, torch.where(std < 1e-6, torch.ones_like(std), std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` in place: no second copy of an array the size of the view."""
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std.to(y.device) + self.mean.to(y.device)

    @property
    def log_abs_det(self) -> float:
        """log|det| of the inverse map: add it to an NLL of standardised latents to get the NLL of
        the latents in their stored units."""
        return float(self.std.double().log().sum())


ARRAYS = ("source", "target", "held_source", "held_target")


@dataclass
class PairedLatents:
    """Standardised (source, target) rows of one view, split into train and held-out parts."""

    view: View
    source: torch.Tensor
    target: torch.Tensor
    held_source: torch.Tensor
    held_target: torch.Tensor
    source_norm: Standardizer
    target_norm: Standardizer
    truth: dict | None  # truth.json of a synthetic view: the analytic NLL
    held_key: np.ndarray | None = None  # key of each held-out pair (for evaluation against ground truth)
    held_rows: tuple[np.ndarray, np.ndarray] | None = None  # (source row, target row) of each held-out pair

    def to(self, device: torch.device) -> PairedLatents:
        """Move the arrays to the device; refuse (naming the sizes) where they would not fit."""
        if device.type == "cuda":
            needed = sum(getattr(self, k).nbytes for k in ARRAYS)
            free, _ = torch.cuda.mem_get_info(device)
            if needed > 0.8 * free:
                raise StoreError(
                    f"{self.view.path}: the joined latents need {needed / 2**30:.1f} GiB but {device} has "
                    f"{free / 2**30:.1f} GiB free; train with --device cpu"
                )
        move = {k: getattr(self, k).to(device) for k in ARRAYS}
        return PairedLatents(self.view, **move, source_norm=self.source_norm, target_norm=self.target_norm,
                             truth=self.truth, held_key=self.held_key, held_rows=self.held_rows)


def heldout_mask(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Rows whose key hashes into the held-out fraction. Deterministic from the key alone (not the
    row order, not the seed), so every caption of one image lands on the same side, and the split
    is the same for every run and every translation task over the same items."""
    unique, inverse = np.unique(keys, return_inverse=True)
    buckets = np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") % 10_000 for k in unique),
        dtype=np.int64,
        count=len(unique),
    )
    return (buckets < round(fraction * 10_000))[inverse]


def finite_latents(store: Store) -> np.ndarray:
    """The store's latents, refused when any is NaN or infinite (a broken expert or a corrupt file)."""
    x = store.latents()
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise StoreError(
            f"{store.path}: {int(bad.sum())} of {len(x)} latents hold NaN or inf (first row {int(bad.argmax())}); "
            f"check it with `n2n-shards verify {store.path}` and extract it again"
        )
    return x


def load_pairs(
    view_path: Path | str, holdout: float = 0.05, norms: tuple[Standardizer, Standardizer] | None = None
) -> PairedLatents:
    """Open a view, join its stores on key, split by key hash, and standardise: with the train rows'
    statistics, or with given (source, target) ones (a resumed run keeps its checkpoint's)."""
    view = open_view(view_path)
    join = view.join()
    held = heldout_mask(join.key, holdout)
    if held.all():
        raise StoreError(f"{view.path}: all {len(held)} pairs fall in the held-out split; lower --holdout")
    # Each side is gathered once per split in its stored dtype, converted once, standardised in
    # place: every pass over a 1M-row view costs about a second on a memory-bound machine.
    source_rows, target_rows = join.source_index, join.target_index
    stored = finite_latents(view.source), finite_latents(view.target)
    arrays = {name: torch.from_numpy(stored[side][rows[mask]]).float()
              for name, side, rows, mask in (("source", 0, source_rows, ~held), ("target", 1, target_rows, ~held),
                                             ("held_source", 0, source_rows, held),
                                             ("held_target", 1, target_rows, held))}
    source_norm, target_norm = norms or (Standardizer.fit(arrays["source"]), Standardizer.fit(arrays["target"]))
    for name, norm in (("source", source_norm), ("held_source", source_norm), ("target", target_norm),
                       ("held_target", target_norm)):
        norm.apply_(arrays[name])
    truth_file = Path(view.path) / "truth.json"
    return PairedLatents(
        view=view,
        **arrays,
        source_norm=source_norm,
        target_norm=target_norm,
        truth=json.loads(truth_file.read_text()) if truth_file.exists() else None,
        held_key=join.key[held],
        held_rows=(source_rows[held], target_rows[held]),
    )
