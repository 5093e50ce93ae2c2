"""n2n-train-classifier: train the small CNN classifier that serves as the ``classifier:PATH`` expert.

Its purpose is a network whose invariances are known, to check a diagnosis against (``n2n.diagnose``):
trained on ``shapes`` to name one attribute (``--label shape``) while the others vary and are never
named, its deep layers need not keep them. Like n2n-train-ae, the dataset's images are decoded once into
a uint8 tensor, batches are cut from it by index, and the run is deterministic from its seed. It reports
the label's accuracy on the held-out ``val`` split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from n2n import plugins
from n2n.cli import CONTEXT, reports_errors
from n2n.errors import N2NError
from n2n.extract.datasets import DatasetError, ItemDataset, ItemError, open_dataset
from n2n.extract.experts.classifier import ConvClassifier, load_classifier, save_classifier
from n2n.extract.train_ae import MAX_IN_MEMORY_BYTES, resolve_device, saved_model
from n2n.files import write_text_atomic
from n2n.options import CONFIG_FILE, check_fields, click_options, config_option, config_text, from_params, setting

console = Console(stderr=True)
EVAL_COUNT = 2000  # held-out images the accuracy is measured on


class TrainClassifierError(N2NError):
    """Bad input the user can fix; the one-line message says how."""


@dataclass(frozen=True)
class TrainClassifierConfig:
    """One run, checked when made. The defaults name the shape of every held-out ``shapes`` image after about
    30 s on two CPU cores. Label smoothing and the longer run are for the diagnosis: with them the logits kept
    colour in 13.6% of the samples (chance 12.9%), without them 19.6% (docs/benchmarks.md, "Diagnosis")."""

    data: str = setting("shapes", "Image dataset whose items carry labels (shapes, folder, hf with label_columns).")
    data_root: Path | None = setting(None, "Where the dataset lives (folder, hf, ...); shapes needs none.")
    dataset_options: dict = setting(default_factory=dict, flag="--data-option",
                                    help="A dataset option, repeatable: e.g. seed=1 (shapes).")
    label: str = setting("shape", "The attribute it learns to name; the others it is never told.")
    channels: tuple[int, ...] = setting((8, 16, 32, 32), "Conv widths, one stride-2 block each (comma-separated); "
                                                          "each block is a layer blockK.")
    grid: int = setting(4, "Cells per side a block's feature map is averaged to, as its layer.", min=1)
    limit: int | None = setting(8000, "Train on the first N images only.", min=1)
    image_size: int = setting(64, "Images are resized (shorter side) and centre-cropped to this.", min=1)
    steps: int = setting(1500, "Optimiser steps.", min=1)
    batch_size: int = setting(64, "Images per step.", min=1)
    lr: float = setting(2e-3, "Peak learning rate (one-cycle schedule).", above=0)
    label_smoothing: float = setting(0.1, "Cross-entropy label smoothing: the logits of one class gather at one "
                                          "point, so they keep less of what the label does not name.", min=0, below=1)
    out: Path = setting(Path("experts/classifier-shapes"), "Folder of the saved expert (config.json, "
                                                           "model.safetensors, report.json, config.yaml).")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    seed: int = setting(0, "Seeds the initial weights and the batch order.", min=0)
    overwrite: bool = setting(False, "Retrain even if --out already holds a classifier.")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.channels or min(self.channels) < 1:
            raise TrainClassifierError(f"--channels must be one or more widths >= 1, not "
                                       f"{','.join(map(str, self.channels))}")
        stages = 2 ** len(self.channels)
        if self.image_size % stages or self.image_size // stages < self.grid:
            raise TrainClassifierError(f"--image-size {self.image_size} must be a multiple of {stages} (one halving "
                                       f"per entry of --channels) leaving at least --grid {self.grid} px")


class _Labelled(torch.utils.data.Dataset):
    """Item i as (uint8 [3, S, S], label index), or None for an unusable item (skipped, not fatal)."""

    def __init__(self, dataset: ItemDataset, label: str, classes: list[str], image_size: int) -> None:
        from n2n.extract.experts.ae import ae_transform

        self.dataset, self.label, self.classes = dataset, label, classes
        self.transform = ae_transform(image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        try:
            item = self.dataset[index]
        except ItemError:
            return None
        pixels = (self.transform(item["image"].convert("RGB")) * 255).round().to(torch.uint8)
        return pixels, self.classes.index(str(item["attributes"][self.label]))


def _usable(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [row for row in rows if row is not None]
    if not rows:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def labelled_dataset(cfg: TrainClassifierConfig, split: str) -> tuple[ItemDataset, list[str]]:
    """The dataset with images and labels, and the label's values; a TrainClassifierError says what is missing."""
    try:
        dataset = open_dataset(cfg.data, cfg.data_root, split, **cfg.dataset_options)
    except DatasetError as err:
        raise TrainClassifierError(str(err)) from err
    lacking = [m for m in ("image", "attributes") if m not in dataset.modalities]
    if lacking:
        raise TrainClassifierError(f"dataset {cfg.data} has no {' or '.join(lacking)} (it has "
                                   f"{', '.join(dataset.modalities)}); a classifier needs labelled images")
    values = dataset.attribute_values()
    if cfg.label not in values:
        raise TrainClassifierError(f"--label {cfg.label}: dataset {cfg.data} labels "
                                   f"{', '.join(values) or 'nothing'}; pick one of those")
    return dataset.with_modalities(["image", "attributes"]), [str(v) for v in values[cfg.label]]


def load_labelled(dataset: ItemDataset, label: str, classes: list[str], image_size: int, limit: int | None,
                  progress: Progress) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images (uint8 [N, 3, S, S]) and their label indices, decoded once."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n * 3 * image_size**2 > MAX_IN_MEMORY_BYTES:
        raise TrainClassifierError(f"{n} images of {image_size}px do not fit in memory; pass --limit N (at most "
                                   f"{MAX_IN_MEMORY_BYTES // (3 * image_size**2)})")
    subset = torch.utils.data.Subset(_Labelled(dataset, label, classes, image_size), range(n))
    workers = 0 if dataset.name == "shapes" else 2  # shapes renders faster than a worker starts
    loader = torch.utils.data.DataLoader(subset, batch_size=256, num_workers=workers, collate_fn=_usable)
    task = progress.add_task(f"decoding {dataset.split} images", total=n, status="")
    chunks = []
    for chunk in loader:
        chunks.append(chunk)
        progress.advance(task, 256)
    images, labels = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    if not len(images):
        raise TrainClassifierError(f"dataset {dataset.name} ({dataset.split}) gave no usable image")
    return images, labels


def fit(model: ConvClassifier, images: torch.Tensor, labels: torch.Tensor, cfg: TrainClassifierConfig,
        progress: Progress) -> float:
    """Train ``model`` in place on random batches (cross-entropy); the mean loss of the last 50 steps."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    order, recent = torch.empty(0, dtype=torch.long), []
    task = progress.add_task("training the classifier", total=cfg.steps, status="")
    model.train()
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:  # a fresh permutation per epoch: each image once per pass
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        index, order = order[: cfg.batch_size], order[cfg.batch_size :]
        index = index.to(images.device)
        loss = F.cross_entropy(model(images[index].float() / 255), labels[index], label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = [*recent[-49:], loss.item()]
        progress.update(task, advance=1, status=f"loss {recent[-1]:.4f}")
    model.eval()
    return sum(recent) / len(recent)


@torch.inference_mode()
def accuracy(model: ConvClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    hits = sum(int((model(chunk.float() / 255).argmax(1) == y).sum())
               for chunk, y in zip(images.split(256), labels.split(256), strict=True))
    return hits / len(labels)


def train_classifier(cfg: TrainClassifierConfig, progress_console: Console = console) -> dict:
    """Train, save to ``cfg.out`` and write ``cfg.out/report.json``; the report (``skipped`` if already done)."""
    if not cfg.overwrite and saved_model(cfg.out, load_classifier, "classifier", TrainClassifierError):
        return {"skipped": True, "out": str(cfg.out)}
    device = resolve_device(cfg.device)
    train_set, classes = labelled_dataset(cfg, "train")
    val_set, _ = labelled_dataset(cfg, "val")
    torch.manual_seed(cfg.seed)
    model = ConvClassifier(cfg.label, classes, cfg.image_size, cfg.channels, cfg.grid).to(device)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=progress_console,
                  transient=True) as progress:
        images, labels = load_labelled(train_set, cfg.label, classes, cfg.image_size, cfg.limit, progress)
        held_images, held_labels = load_labelled(val_set, cfg.label, classes, cfg.image_size, EVAL_COUNT, progress)
        started = time.perf_counter()
        loss = fit(model, images.to(device), labels.to(device), cfg, progress)
        seconds = time.perf_counter() - started
    report = {"out": str(cfg.out), "data": cfg.data, "label": cfg.label, "classes": classes, "images": len(images),
              "steps": cfg.steps, "seconds": round(seconds, 1), "final_train_loss": loss,
              "val_accuracy": accuracy(model, held_images.to(device), held_labels.to(device)),
              "val_images": len(held_images), "layers": dict(model.dims()), "device": str(device)}
    save_classifier(model.cpu(), cfg.out)
    write_text_atomic(cfg.out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(cfg.out / CONFIG_FILE, config_text(asdict(cfg)))  # n2n-train-classifier --config OUT/config.yaml
    return report


def summary_table(report: dict) -> Table:
    table = Table(title="n2n-train-classifier", show_header=False)
    table.add_row("saved to", f"{report['out']} (use --expert classifier:{report['out']}@LAYER)")
    table.add_row("names", f"{report['label']}: {', '.join(report['classes'])}")
    table.add_row("images, steps", f"{report['images']}, {report['steps']} ({report['seconds']:.1f} s on "
                                   f"{report['device']})")
    table.add_row("held-out accuracy", f"{report['val_accuracy']:.1%} of {report['val_images']} val images")
    table.add_row("layers", ", ".join(f"{name} ({dim})" for name, dim in report["layers"].items()))
    return table


@click.command(context_settings=CONTEXT)
@config_option
@click_options(TrainClassifierConfig, more_help={"data": f"Installed: {plugins.listing('dataset')}."})
@reports_errors
def main(**options: object) -> None:
    """Train a small CNN to name one label of a dataset's images, and save it as the expert classifier:OUT.

    Its layers (block1.., pool, logits) are extracted as classifier:OUT@LAYER; trained on shapes to name
    the shape, it is the expert with known invariances that n2n-diagnose is checked on. A finished OUT is
    left alone unless --overwrite.

    Example: n2n-train-classifier --data shapes --label shape --out experts/classifier-shapes
    """
    cfg = from_params(TrainClassifierConfig, options)
    report = train_classifier(cfg)
    if report.get("skipped"):
        console.print(f"{cfg.out} already holds a classifier: nothing to do (--overwrite retrains it)",
                      highlight=False)
        return
    Console().print(summary_table(report))
