"""A view's training pairs streamed from its stores, for views larger than the device's memory.

Only the keys and the join's row indices are held whole. The pairs are cut into windows of about
``window_pairs`` pairs: each window is a random set of the source store's files (zarr chunks, tars,
HDF5 chunks), with the pairs whose source row they hold. A background thread reads the next
window's source and target rows (``Store.take``: only the files that hold them) and moves them to
the device while the trainer draws batches from the current one; inside a window, pairs are drawn
in a random order without replacement. So the shuffle spans files (the window's files are drawn
at random every epoch) and rows (a random order within the window), and a step waits on a read
only when one window is used up before the next is read.

Every draw depends on (seed, epoch, window) and on the number of batches drawn, nothing else: a
resumed run skips to where it stopped, and every rank under torchrun reads the same windows and
keeps its slice of each global batch, as with a view on the device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from n2n.parallel import ONE_PROCESS, Ranks
from n2n.shards import Store, StoreError
from n2n.shards.view import View
from n2n.train.data import (
    BLOCK_ROWS,
    Rows,
    Standardizer,
    ViewSplit,
    check_finite,
    rank_batch,
    read_truth,
    split_pairs,
)

WINDOW_PAIRS = 1 << 16  # pairs per window: ~50 MB of 384-dim float16 captions; up to three are held at a time


def counted_blocks(store: Store, rows: np.ndarray) -> Iterator[torch.Tensor]:
    """float32 blocks of ``store.latents()[rows]`` (rows repeated as often as they occur), read block
    by block from the store: a view's statistics in one pass over its stores, and a NaN check."""
    counts = np.bincount(rows, minlength=len(store))
    for start, latents in store.latent_files():
        block = torch.from_numpy(latents)
        check_finite(store, block.float(), start)
        picked = np.repeat(np.arange(len(latents)), counts[start : start + len(latents)])
        for i in range(0, len(picked), BLOCK_ROWS):
            yield block[torch.from_numpy(picked[i : i + BLOCK_ROWS])].float()


def read_rows(store: Store, rows: np.ndarray, norm: Standardizer, device: torch.device) -> Rows:
    """``store``'s latents of ``rows`` (repeats read once) as training rows on ``device``; NaN refused."""
    unique, inverse = np.unique(rows, return_inverse=True)
    latents = torch.from_numpy(store.take(unique))
    for i in range(0, len(unique), BLOCK_ROWS):  # block by block: no float32 copy of the whole
        check_finite(store, latents[i : i + BLOCK_ROWS].float(), unique[i : i + BLOCK_ROWS])
    return Rows(latents.to(device), torch.from_numpy(inverse).to(device), norm)


@dataclass
class Window:
    """One window's pairs on the device, in the order they are drawn."""

    source: Rows
    target: Rows
    order: torch.Tensor  # a permutation of the window's pairs

    def batches(self, size: int) -> int:
        return len(self.order) // size  # the tail (< a batch) is left for the next epoch's draw


class PairStream:
    """Draws training batches of one view window by window (see the module's docstring)."""

    def __init__(self, view: View, source_index: np.ndarray, target_index: np.ndarray,
                 norms: tuple[Standardizer, Standardizer], device: torch.device, batch_size: int, seed: int,
                 window_pairs: int = WINDOW_PAIRS, start_batch: int = 0) -> None:
        self.view, self.device, self.batch_size, self.seed = view, device, batch_size, seed
        self.source_index, self.target_index, self.norms = source_index, target_index, norms
        if len(source_index) < batch_size:
            raise StoreError(f"{view.path}: {len(source_index)} training pairs are fewer than one batch of "
                             f"{batch_size}: lower --batch-size, or train without --stream")
        bounds = view.source.bounds()
        file_of = np.searchsorted(bounds, source_index, side="right") - 1
        self.by_file = np.argsort(file_of, kind="stable")  # pair ids, grouped by the source file
        self.file_start = np.searchsorted(file_of[self.by_file], np.arange(len(bounds)))
        self.window_pairs = max(window_pairs, batch_size)
        self.windows: queue.Queue = queue.Queue(maxsize=1)  # the next window, read ahead
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.position = self._locate(start_batch)
        self.skip = self.position[2]  # batches of the first window already drawn (a resumed run)
        self.current: Window | None = None
        self.left = self.cursor = 0
        self.thread = threading.Thread(target=self._read_ahead, name="n2n-stream", daemon=True)
        self.thread.start()

    def __len__(self) -> int:
        return len(self.source_index)

    # ------------------------------------------------------------ the plan: a function of (seed, epoch)

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The pair ids of each window of one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        windows, current, size = [], [], 0
        for file in rng.permutation(len(self.file_start) - 1):
            pairs = self.by_file[self.file_start[file] : self.file_start[file + 1]]
            if len(pairs):
                current.append(pairs)
                size += len(pairs)
            if size >= self.window_pairs:
                windows.append(np.concatenate(current))
                current, size = [], 0
        if current:
            windows.append(np.concatenate(current))
        return windows

    def _locate(self, batch: int) -> tuple[int, int, int]:
        """(epoch, window, batch within it) of the ``batch``-th batch drawn since the start."""
        epoch = 0
        while True:
            for w, pairs in enumerate(self.plan(epoch)):
                n = len(pairs) // self.batch_size
                if batch < n:
                    return epoch, w, batch
                batch -= n
            epoch += 1

    # ------------------------------------------------------------ reading (the background thread)

    def _read_ahead(self) -> None:
        epoch, first, _ = self.position
        try:
            while not self.stopped.is_set():
                for w, pairs in enumerate(self.plan(epoch)):
                    if w < first:
                        continue
                    window = self._read(epoch, w, pairs)
                    while not self.stopped.is_set():
                        try:
                            self.windows.put(window, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                first, epoch = 0, epoch + 1
        except BaseException as err:  # surfaced to the trainer by batch()
            self.error = err
            self.windows.put(None)

    def _read(self, epoch: int, w: int, pairs: np.ndarray) -> Window:
        sides = [read_rows(store, index[pairs], norm, self.device)
                 for store, index, norm in ((self.view.source, self.source_index, self.norms[0]),
                                            (self.view.target, self.target_index, self.norms[1]))]
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, epoch, w]).integers(2**62)))
        order = torch.randperm(len(pairs), generator=generator).to(self.device)
        return Window(*sides, order)

    # ------------------------------------------------------------ drawing (the trainer's thread)

    def _next_window(self) -> Window:
        window = self.windows.get()
        if window is None:
            raise self.error  # type: ignore[misc]
        return window

    def batch(self, size: int, generator: torch.Generator, noise: float = 0.0,
              ranks: Ranks = ONE_PROCESS) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (target, source) batch; under torchrun, this rank's slice of it."""
        if size != self.batch_size:
            raise ValueError(f"this stream draws batches of {self.batch_size}, not {size}")
        while self.left <= 0:  # a window of fewer pairs than a batch (an epoch's last) gives none
            self.current = self._next_window()
            self.left, self.cursor = self.current.batches(size) - self.skip, self.skip * size
            self.skip = 0  # only the first window is entered part-way
        idx = self.current.order[self.cursor : self.cursor + size]
        self.cursor += size
        self.left -= 1
        return rank_batch(self.current.target, self.current.source, idx, generator, noise, ranks)

    def close(self) -> None:
        self.stopped.set()
        while not self.windows.empty():
            self.windows.get_nowait()
        self.thread.join(timeout=5)


@dataclass(kw_only=True)
class StreamedPairs(ViewSplit):
    """A view's pairs with the training ones read from the stores as training goes (``Pairs``); the
    held-out ones used for evaluation sit on the device."""

    stream: PairStream

    @property
    def train_pairs(self) -> int:
        return len(self.stream)

    def batch(self, size: int, generator: torch.Generator, noise: float = 0.0,
              ranks: Ranks = ONE_PROCESS) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream's next batch (see ``Pairs.batch`` and ``PairStream.batch``)."""
        return self.stream.batch(size, generator, noise, ranks)

    def close(self) -> None:
        self.stream.close()


def stream_pairs(view_path: Path | str, holdout: float, norms: tuple[Standardizer, Standardizer] | None, *,
                 device: torch.device, batch_size: int, seed: int, eval_rows: int, start_batch: int = 0,
                 window_pairs: int = WINDOW_PAIRS) -> StreamedPairs:
    """A view's pairs for training without loading its latents: statistics from one pass over the
    stores (which also refuses NaN), the first ``eval_rows`` held-out pairs on the device, and the
    training pairs streamed."""
    view, join, held = split_pairs(view_path, holdout)
    train_rows = join.source_index[~held], join.target_index[~held]
    if norms is None:
        norms = tuple(Standardizer.fit(counted_blocks(store, rows))
                      for store, rows in zip((view.source, view.target), train_rows, strict=True))
    held_pairs = np.flatnonzero(held)[:eval_rows]
    held_rows = {}
    for side, store, index, norm in (("source", view.source, join.source_index, norms[0]),
                                     ("target", view.target, join.target_index, norms[1])):
        held_rows[f"held_{side}"] = read_rows(store, index[held_pairs], norm, device)
    stream = PairStream(view, *train_rows, norms, device, batch_size, seed, window_pairs, start_batch)
    return StreamedPairs(view=view, **held_rows, source_norm=norms[0], target_norm=norms[1], truth=read_truth(view),
                         held_key=join.key[held_pairs],
                         held_rows=(join.source_index[held_pairs], join.target_index[held_pairs]), stream=stream)
