"""Stage 1: run one frozen expert once over one dataset and write its latents to stores.

Three things overlap, so the expert never waits on decoding or on disk:

    loader workers   dataset[i] -> expert.rows(item) -> expert.collate(rows)   decode, preprocess, tokenise
    main thread      batch -> device -> expert.encode (autocast on GPU)         the forward pass
    writer thread    latents -> one StoreWriter per layer, committed every few seconds

Resuming after a crash gives the store an uninterrupted run would have written, bit for bit on a
deterministic CPU expert: batches are always cut at the same item boundaries (the batch size is
kept in the store's meta), a resumed run restarts at the batch that holds the last committed row,
and each store skips the rows it already has.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from n2n.errors import N2NError
from n2n.extract.datasets import ItemDataset, ItemError, open_dataset
from n2n.extract.experts import Expert, load_expert
from n2n.options import CONFIG_FILE, check_fields, config_text, setting
from n2n.parallel import Ranks, pick_device, usable_cores
from n2n.shards import (
    Store,
    StoreError,
    StoreWriter,
    as_path,
    create_store,
    is_remote,
    is_store,
    open_store,
    remove_tree,
    resume_store,
    write_text_atomic,
)
from n2n.shards.parts import commit_parts, existing_ranges, open_parts, part_meta, part_path, part_ranges, parts_dir

ERRORS = "errors.jsonl"
ATTRIBUTES = "attributes.jsonl"
WEIGHTS_FROM_STORE = "weights_from_store"
# entries of a store's expert/dataset meta that same_origin ignores (stores written before "options" and "space"
# resume)
RECORDS = (WEIGHTS_FROM_STORE, "plugin", "options", "space")


class ExtractError(N2NError):
    """Bad input or a failed item under --on-error fail; the message names it and the way on."""


def default_workers() -> int:
    """Loader processes by default: one per core, at most 4 (decoding and tokenising keep up with a GPU)."""
    return min(4, usable_cores())


@dataclass
class ExtractConfig:
    """One extraction: which expert over which data, where to, and how. Checked when made; each field is
    an n2n-extract option (and a key of its --config file)."""

    expert: str = setting(help="Expert spec name[:model][@layer]; e.g. minilm, bert:bert-base-uncased@cls, "
                               "timm:resnet50@stage3, ae:experts/ae-shapes.")
    data: str = setting(help="Dataset name.")
    data_root: Path | None = setting(None, "Where the dataset lives (coco, folder, wds; hf: a save_to_disk folder, a "
                                           "folder of Parquet/Arrow files or of images with a metadata file, or a "
                                           "Hub dataset id); shapes and biggan need none.")
    split: str = setting("train", "The dataset's own split: train | val (hf: any split it has).")
    out: Path = setting(Path("shards"), "Root of the stores: writes OUT/<data>/<expert>[@layer]/.", url=True)
    format: str = setting("zarr", "Store format (zarr, wds, h5, or a plug-in's).")
    batch_size: int = setting(64, "Items per forward pass (fixed for the life of a store).", min=1)
    num_workers: int = setting(default_factory=default_workers, min=0,
                               help="Loader processes (decode, preprocess): by default one per core, at most 4; 0 "
                                    "loads in the main process.")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = setting("float16", "Stored latent dtype.", choices=("float16", "float32"))
    limit: int | None = setting(None, "Only the first N items.", min=1)
    layers: list[str] | None = setting(None, "Layers to store, comma-separated: one store each, from one forward "
                                             "pass.  [default: the expert's first]")
    weights: Path | None = setting(None, "Local weights (file or folder) instead of the hub: the way to run offline.")
    on_error: str = setting("skip", "A corrupt image or empty caption: skip it (recorded in errors.jsonl) or stop.",
                            choices=("skip", "fail"))
    overwrite: bool = setting(False, "Redo the stores even if they are complete.")
    commit_every: float = setting(30.0, "Seconds between commits: the most work a crash can cost.", min=0)
    data_options: dict = setting(default_factory=dict, flag="--data-option",
                                 help="A dataset option, repeatable: e.g. seed=1, size=128 (shapes), "
                                      "classes=1,207,980 (biggan).")
    expert_options: dict = setting(default_factory=dict, flag="--expert-option",
                                   help="An option of the expert family, repeatable: e.g. size=64 (sdvae: the "
                                        "image size it encodes).")

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("expert", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ExtractError(f"{name} = {getattr(self, name)!r}: name an {name}, e.g. "
                                   f"{'minilm' if name == 'expert' else 'shapes'}")
        for name in ("data_options", "expert_options"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(key, str) and key for key in value):
                raise ExtractError(f"{name} = {value!r}: give a dict of option names to values, e.g. {{'size': 64}}")
        if self.layers is not None and (isinstance(self.layers, str) or not all(self.layers)):
            raise ExtractError(f"layers = {self.layers!r}: give a list of layer names, e.g. ['cls', 'mean']")


# ---------------------------------------------------------------- loader side (runs in workers)


class ItemRows(torch.utils.data.Dataset):
    """dataset[i] -> (key, rows, error) in a loader worker: a bad item becomes a record, not a crash."""

    def __init__(self, dataset: ItemDataset, expert: Expert) -> None:
        self.dataset, self.expert = dataset, expert

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, list, str | None]:
        try:
            item = self.dataset[index]
            return item["key"], self.expert.rows(item), None
        except ItemError as e:
            return e.key, [], e.reason
        except Exception as e:  # a decoder's own exception on a broken file: record it with the key
            return self.dataset.key(index), [], f"{type(e).__name__}: {e}"


class Collate:
    """Flatten items to rows (one per caption for text experts) and let the expert batch them."""

    def __init__(self, expert: Expert) -> None:
        self.expert = expert

    def __call__(self, records: list[tuple[str, list, str | None]]) -> dict:
        keys, subs, rows, errors = [], [], [], []
        for key, item_rows, error in records:
            if error is not None:
                errors.append((key, error))
            keys += [key] * len(item_rows)
            subs += range(len(item_rows))
            rows += item_rows
        return {"keys": keys, "sub": np.asarray(subs, dtype=np.int64), "errors": errors, "items": len(records),
                "inputs": self.expert.collate(rows) if rows else None}


# ---------------------------------------------------------------- writer side (a background thread)


class StoreSink:
    """Appends each layer's latents to its store in a background thread; commits every few seconds.

    ``skip[layer]`` rows at the start of the stream are already committed in that store (a resumed
    run recomputes the whole batch that holds its last committed row) and are dropped here.
    """

    def __init__(self, writers: dict[str, StoreWriter], skip: dict[str, int], commit_every: float) -> None:
        self.writers, self.skip, self.commit_every = writers, dict(skip), commit_every
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="n2n-store-writer", daemon=True)
        self.thread.start()

    def put(self, keys: list[str], sub: np.ndarray, latents: dict[str, np.ndarray]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((keys, sub, latents))

    def close(self) -> None:
        """Drain the queue and commit; raises what the writer thread hit."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        last_commit = time.monotonic()
        try:
            while (entry := self.queue.get()) is not None:
                keys, sub, latents = entry
                for layer, writer in self.writers.items():
                    drop = min(self.skip[layer], len(keys))
                    self.skip[layer] -= drop
                    if drop < len(keys):
                        writer.append(keys[drop:], sub[drop:], latents[layer][drop:])
                if time.monotonic() - last_commit >= self.commit_every:
                    for writer in self.writers.values():
                        writer.flush()
                    last_commit = time.monotonic()
            for writer in self.writers.values():
                writer.flush()
        except BaseException as e:  # surfaced to the main thread by put() / close()
            self.error = e
            while self.queue.get() is not None:  # unblock the producer until it sees the error
                pass


# ---------------------------------------------------------------- planning: paths, resume points


def store_paths(cfg: ExtractConfig, expert: Expert, layers: list[str]) -> dict[str, Path]:
    """shards/<data>/<expert>/ for the expert's default layer, else <expert>@<layer>/ for each layer
    named (in the spec or by --layers). Splits other than train get their own data folder,
    shards/<data>-<split>/, so that both can coexist."""
    base = data_folder(cfg)
    if cfg.layers is None and expert.spec_layer is None:
        return {layers[0]: base / expert.name}
    return {layer: base / f"{expert.name}@{layer}" for layer in layers}


def data_folder(cfg: ExtractConfig) -> Path:
    """OUT/<data>/ (OUT/<data>-<split>/ for other splits than train): the folder of a dataset's stores,
    and of what the dataset caches for all of them (``ItemDataset.prepare``)."""
    return as_path(cfg.out) / (cfg.data if cfg.split == "train" else f"{cfg.data}-{cfg.split}")


def pick_layers(cfg: ExtractConfig, expert: Expert) -> list[str]:
    layers = cfg.layers or [expert.layers[0]]
    unknown = [layer for layer in layers if layer not in expert.layers]
    if unknown:
        raise ExtractError(
            f"expert {expert.spec} has no layer {', '.join(unknown)}; its layers: {', '.join(expert.layers)}"
        )
    return layers


def store_meta(cfg: ExtractConfig, expert: Expert, dataset: ItemDataset, layer: str, limit: int,
               path: Path) -> dict:
    """What a store records of its origin: a view refuses to pair stores that do not belong together."""
    return {
        "expert": {**expert.identity(), "layer": layer, **shared_space(expert, layer),
                   **weights_from_store(expert.weights, path)},
        "dataset": {**dataset.describe(), "limit": cfg.limit, "options": cfg.data_options},
        "split": cfg.split,
        "extraction": {"batch_size": cfg.batch_size, "items": limit, "dtype": cfg.dtype},
    }


def shared_space(expert: Expert, layer: str) -> dict:
    """``{"space": name}`` where the layer's latents share a space with another expert's (``Expert.space``)."""
    space = expert.space(layer)
    return {"space": space} if space is not None else {}


def weights_from_store(weights: str | None, store: Path) -> dict:
    """Where local weights lie as seen from the store, so that a project folder (shards/ and experts/
    together) that is moved or copied still finds them: ``{"weights_from_store": relative path}``."""
    if not weights or is_remote(store) or not Path(weights).exists():
        return {}
    return {WEIGHTS_FROM_STORE: os.path.relpath(Path(weights).resolve(), Path(store).resolve())}


def same_origin(existing: dict, wanted: dict) -> bool:
    """Same expert, dataset and split: the store can be resumed or reused. Where weights lay and which
    distribution provided the plug-in (and its version) are records, not identity: they may change."""
    def identity(entry: object) -> object:
        return {k: v for k, v in entry.items() if k not in RECORDS} if isinstance(entry, dict) else entry

    return all(identity(existing.get(k)) == identity(wanted[k]) for k in ("expert", "dataset", "split"))


def resume_point(keys: np.ndarray, index_of: dict[str, int], batch_size: int, lo: int = 0) -> int:
    """The first item of the batch that holds a store's last committed row (``lo`` for an empty store)."""
    return index_of[str(keys[-1])] // batch_size * batch_size if len(keys) else lo


def rows_before(keys: np.ndarray, index_of: dict[str, int], item: int) -> int:
    """Committed rows that belong to items before ``item`` (rows are in item order)."""
    items = np.fromiter((index_of[k] for k in keys.tolist()), dtype=np.int64, count=len(keys))
    return int(np.searchsorted(items, item, side="left"))


# ---------------------------------------------------------------- the run


def batches(start: int, stop: int, size: int) -> list[list[int]]:
    """Item indices cut at fixed multiples of ``size``: the same boundaries on every run."""
    return [list(range(i, min(i + size, stop))) for i in range(start, stop, size)]


def encode_batches(expert: Expert, loader: torch.utils.data.DataLoader, layers: list[str],
                   device: torch.device) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """Run the expert on each loaded batch; yield the batch and its latents on the host."""
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    for batch in loader:
        latents: dict[str, np.ndarray] = {}
        if batch["inputs"] is not None:
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch["inputs"].items()}
            with torch.inference_mode(), autocast:
                out = expert.encode(inputs, layers)
            latents = {layer: out[layer].float().cpu().numpy() for layer in layers}
        yield batch, latents


def append_errors(paths: list[Path], errors: list[tuple[str, str]]) -> None:
    """Record skipped items (key, reason) in every store's errors.jsonl as they happen."""
    if not errors:
        return
    for path in paths:
        lines = "".join(json.dumps({"key": k, "reason": r}) + "\n" for k, r in errors)
        if is_remote(path):  # an object cannot be appended to: rewrite it (a few lines per failed item)
            old = (path / ERRORS).read_text(encoding="utf-8") if (path / ERRORS).exists() else ""
            write_text_atomic(path / ERRORS, old + lines)
        else:
            with open(path / ERRORS, "a", encoding="utf-8") as f:
                f.write(lines)


def finish_side_files(path: Path, dataset: ItemDataset, index_of: dict[str, int]) -> int:
    """De-duplicate errors.jsonl (a resumed batch logs its errors again) and write the items'
    ground-truth attributes where the dataset has them. Returns the number of failed items."""
    errors_file = path / ERRORS
    failed = 0
    if errors_file.exists():
        unique = {json.loads(line)["key"]: line for line in errors_file.read_text().splitlines() if line.strip()}
        write_text_atomic(errors_file, "".join(line + "\n" for line in unique.values()))
        failed = len(unique)
    keys = open_store(path, require_complete=False).keys
    first = [str(k) for k in keys[np.r_[True, keys[1:] != keys[:-1]]]] if len(keys) else []
    attrs = [dataset.attributes(index_of[k]) for k in first]
    if attrs and attrs[0] is not None:
        write_text_atomic(path / ATTRIBUTES,
                          "".join(json.dumps({"key": k, **a}) + "\n" for k, a in zip(first, attrs, strict=True)))
    return failed


@dataclass
class Job:
    """What one extraction writes: the expert, the dataset, and one store per layer."""

    cfg: ExtractConfig
    expert: Expert
    dataset: ItemDataset
    layers: list[str]
    items: int
    paths: dict[str, Path]
    metas: dict[str, dict]

    def summary(self, paths: dict[str, Path] | None = None, **fields: object) -> dict:
        """What run_extraction() returns: the stores written, then rows, timings and flags as ``fields`` say."""
        stores = [str(p) for p in (paths or self.paths).values()]
        return {"stores": stores, "skipped": 0, "seconds": 0.0, "items_per_s": 0.0, "already_complete": False,
                **fields}

    def stored_batch_size(self) -> int:
        """The batch size the stores (or their parts) were begun with: it fixes the batch boundaries."""
        for path in self.paths.values():
            for candidate in (path, *(part_path(path, lo, hi) for lo, hi in existing_ranges(path))):
                if is_store(candidate):
                    return open_store(candidate, require_complete=False).meta["extraction"]["batch_size"]
        return self.cfg.batch_size


def plan(cfg: ExtractConfig) -> Job:
    """Open the dataset and the expert and name the stores; cheap checks first."""
    dataset = open_dataset(cfg.data, cfg.data_root, cfg.split, **cfg.data_options)
    expert = load_expert(cfg.expert, cfg.weights, options=cfg.expert_options)
    if expert.modality not in dataset.modalities:
        raise ExtractError(
            f"expert {expert.spec} reads {expert.modality!r} but dataset {cfg.data} has "
            f"{', '.join(dataset.modalities)}; pick an expert for one of those"
        )
    dataset = dataset.with_modalities([expert.modality])  # a text expert never decodes the images
    expert = expert.bound_to(dataset)
    layers = pick_layers(cfg, expert)
    items = min(len(dataset), cfg.limit) if cfg.limit else len(dataset)
    paths = store_paths(cfg, expert, layers)
    metas = {layer: store_meta(cfg, expert, dataset, layer, items, paths[layer]) for layer in layers}
    return Job(cfg, expert, dataset, layers, items, paths, metas)


def run_extraction(cfg: ExtractConfig, console: Console | None = None) -> dict:
    """Extract (or resume, or confirm complete) the stores of one expert over one dataset.

    Under torchrun each rank extracts its own range of items into parts of the stores, and rank 0
    commits the parts into the stores once every rank is done (shards.parts).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenisers run in forked loader workers
    import transformers  # here: a second to import, which a bad option or --help need not wait for

    transformers.logging.disable_progress_bar()  # one progress bar, ours
    ranks = Ranks.from_env()
    joined = ranks.init("gloo")  # only barriers pass between ranks: gloo serves CPU and GPU jobs alike
    console = console or Console(stderr=True)
    try:
        device = pick_device(cfg.device, ranks.local, ExtractError)
        job = plan(cfg)
        if cfg.overwrite and ranks.main:
            for path in job.paths.values():
                remove_tree(path)
                remove_tree(parts_dir(path))
        ranks.barrier()
        finished = {layer: open_store(p, require_complete=False)
                    for layer, p in job.paths.items() if is_store(p)}
        for layer, store in finished.items():
            check_origin(store, job.metas[layer])
        if len(finished) == len(job.paths) and all(s.complete for s in finished.values()):
            if ranks.main:  # a commit that was cut off after the stores were complete leaves parts behind
                for path in job.paths.values():
                    remove_tree(parts_dir(path))
            console.print(f"already complete: {', '.join(str(p) for p in job.paths.values())} "
                          f"({len(finished[job.layers[0]])} rows); --overwrite redoes it")
            return job.summary(rows=len(finished[job.layers[0]]), already_complete=True)
        if ranks.world == 1 and not any(existing_ranges(p) for p in job.paths.values()):
            summary = extract_items(job, job.paths, job.metas, 0, job.items, device, console)
        else:
            summary = extract_parts(job, ranks, device, console)
        if ranks.main:  # each finished store keeps the options it was made with, to be made again from them
            for path in job.paths.values():
                write_text_atomic(as_path(path) / CONFIG_FILE, config_text(asdict(cfg)))
        return summary
    finally:
        if joined:
            dist.destroy_process_group()


def extract_parts(job: Job, ranks: Ranks, device: torch.device, console: Console) -> dict:
    """This rank's range of items into parts of the stores; rank 0 then commits them. Parts that are
    all complete (a commit cut off) are committed by any number of processes, one included."""
    started = [p for p in job.paths.values() if is_store(p) and not parts_dir(p).exists()]
    if started:
        raise ExtractError(f"{started[0]} was begun by a single process: rerun without torchrun / --nproc to "
                           "finish it, or pass --overwrite")
    if all_parts_complete(job):
        if ranks.main:
            for path in job.paths.values():
                commit_parts(path)
        ranks.barrier()
        rows = len(open_store(job.paths[job.layers[0]]))
        console.print(f"committed the finished parts: {', '.join(map(str, job.paths.values()))} ({rows} rows)")
        return job.summary(rows=rows)
    batch_size = job.stored_batch_size()
    ranges = part_ranges(job.items, batch_size, ranks.world)
    for path in job.paths.values():
        foreign = sorted(set(existing_ranges(path)) - set(ranges))
        if foreign:
            raise ExtractError(
                f"{parts_dir(path)} holds parts for items {foreign}, cut for another number of processes than "
                f"{ranks.world}: rerun with the process count that began them, or pass --overwrite"
            )
    lo, hi = ranges[ranks.rank]
    paths = {layer: part_path(path, lo, hi) for layer, path in job.paths.items()}
    metas = {layer: part_meta(meta, lo, hi, job.items) for layer, meta in job.metas.items()}
    summary = extract_items(job, paths, metas, lo, hi, device, console, batch_size, f" (rank {ranks.rank})",
                            bar=ranks.main)
    ranks.barrier()
    if ranks.main:
        for path in job.paths.values():
            commit_parts(path)
        summary |= {"stores": [str(p) for p in job.paths.values()], "rows": len(open_store(job.paths[job.layers[0]]))}
    ranks.barrier()
    return summary


def all_parts_complete(job: Job) -> bool:
    """Whether every store's parts are on disk, complete and tiling the items: only the commit is left."""
    try:
        return all(same_origin(open_parts(path)[0].meta, job.metas[layer]) for layer, path in job.paths.items())
    except StoreError:
        return False


def check_origin(store: Store, wanted: dict) -> None:
    if not same_origin(store.meta, wanted):
        raise ExtractError(f"{store.path} holds latents of another expert, dataset or split; pass --overwrite "
                           "to replace it, or --out elsewhere")


def extract_items(job: Job, paths: dict[str, Path], metas: dict[str, dict], lo: int, hi: int,
                  device: torch.device, console: Console, batch_size: int | None = None, label: str = "",
                  bar: bool = True) -> dict:
    """Items [lo, hi) of the dataset into one store per layer: created, resumed, or left as complete.
    ``label`` names the rank in messages; ``bar`` off: no progress bar (one per job, rank 0's)."""
    cfg, expert, dataset, layers = job.cfg, job.expert, job.dataset, job.layers
    existing = {layer: open_store(p, require_complete=False)
                for layer, p in paths.items() if is_store(p)}
    for layer, store in existing.items():
        check_origin(store, metas[layer])
    summary = job.summary(paths, config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()})
    if len(existing) == len(paths) and all(s.complete for s in existing.values()):  # this rank's part is done
        return summary | {"rows": len(next(iter(existing.values())))}
    dataset.prepare(range(lo, hi), data_folder(cfg), device, console)  # e.g. caption items, before any store is made

    # Resume: the stored batch size fixes the batch boundaries; restart at the earliest store's batch.
    batch_size = batch_size or job.stored_batch_size()
    index_of = {dataset.key(i): i for i in range(lo, hi)}
    start = min((resume_point(existing[layer].keys, index_of, batch_size, lo) if layer in existing else lo)
                for layer in layers)
    skip = {layer: len(existing[layer]) - rows_before(existing[layer].keys, index_of, start) if layer in existing
            else 0 for layer in layers}
    writers = {
        layer: resume_store(paths[layer]) if layer in existing and not existing[layer].complete
        else create_store(paths[layer], dim=expert.dims[layer], dtype=cfg.dtype, format=cfg.format, meta=metas[layer])
        for layer in layers
    }
    if start > lo:
        console.print(f"resuming at item {start} of {hi}{label} (batch size {batch_size}, as first run)")

    expert.to(device)
    loader = torch.utils.data.DataLoader(
        ItemRows(dataset, expert), batch_sampler=batches(start, hi, batch_size), num_workers=cfg.num_workers,
        collate_fn=Collate(expert), pin_memory=device.type == "cuda",
    )
    sink = StoreSink(writers, skip, cfg.commit_every)
    t0 = time.perf_counter()
    progress = Progress(TextColumn(f"[bold]extract {expert.name} on {cfg.data}{label}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("{task.fields[rate]} items/s"), TimeRemainingColumn(),
                        console=console, disable=not bar)
    try:
        with progress:
            task = progress.add_task("extract", total=hi - lo, completed=start - lo, rate="-")
            for batch, latents in encode_batches(expert, loader, layers, device):
                if batch["errors"] and cfg.on_error == "fail":
                    key, reason = batch["errors"][0]
                    raise ExtractError(f"item {key}: {reason} (--on-error skip records it and goes on)")
                append_errors(list(paths.values()), batch["errors"])
                if latents:
                    sink.put(batch["keys"], batch["sub"], latents)
                done = progress.tasks[0].completed + batch["items"]
                progress.update(task, completed=done, rate=f"{(done + lo - start) / (time.perf_counter() - t0):.1f}")
    except KeyboardInterrupt:
        raise ExtractError(f"interrupted; what was extracted is committed in {paths[layers[0]].parent}: "
                           "rerun the same command to resume") from None
    finally:
        sink.close()  # commits every row handed over so far, on success and on failure alike
    for writer in writers.values():
        writer.close()
    failed = max(finish_side_files(p, dataset, index_of) for p in paths.values())
    seconds = time.perf_counter() - t0
    return summary | {"rows": len(open_store(next(iter(paths.values())))), "skipped": failed, "seconds": seconds,
                      "items_per_s": (hi - start) / seconds if seconds else 0.0}
