"""``n2n.diagnose``: what each layer of an expert keeps, seen through a decoder (the paper's diagnosis).

For each layer a translator learns p(decoder latent | layer). Its samples for one input share what the
layer keeps and vary in what it is invariant to: a layer that names only the shape gives samples of every
colour. So one folder gets, per layer:

- the held-out NLL of the decoder's latent given the layer, beside the linear-Gaussian floor (how much of
  the image the layer explains, in bits/dim);
- where the dataset's scorer reads attributes off decoded images (shapes), for each attribute the share
  of samples whose reading equals the input's (*kept*, beside *chance*: a draw from the data's values)
  and the entropy of the readings across an input's samples over a perfect sampler's (*free*: 1 is as
  varied as the data);
- ``diagnosis.png``: held-out inputs as rows, the input, then a few decoded samples per layer.

The stores are made once and shared: one forward pass of the expert writes every layer's store, the
decoder's store serves every layer's translator, and a rerun skips complete stores and runs (an
interrupted run resumes). The decoder's own latent gets a translator too (``reference``): it keeps
everything, the row that shows the decoder and the judge can be trusted.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from n2n.diagnose.figure import diagnosis_figure
from n2n.errors import N2NError
from n2n.extract.datasets import DatasetError, dataset_class, open_dataset, reopen_dataset
from n2n.extract.experts import Expert, load_expert
from n2n.extract.run import ExtractConfig, run_extraction
from n2n.files import write_json_atomic
from n2n.options import check_fields, load_options, setting
from n2n.scoring import normalized_entropy, uniform_entropy
from n2n.shards import open_store
from n2n.shards.view import pair
from n2n.train.checkpoint import CHECKPOINT, read_meta, run_view
from n2n.train.data import split_pairs

REFERENCE = "reference"  # the decoder's own latent as a layer: a row that keeps everything


class DiagnoseError(N2NError):
    """Bad input the user can fix; the one-line message says how."""


@dataclass
class DiagnoseConfig:
    """One diagnosis; each field is an n2n-diagnose option (and a key of its --config file), checked when made."""

    expert: str = setting(help="The expert to diagnose, without a layer: e.g. classifier:experts/classifier-shapes "
                               "or timm:resnet50.")
    layers: list[str] = setting(help="Its layers to translate, comma-separated, at least 2: e.g. "
                                     "block1,block2,pool,logits or stage1,stage2,stage3,stage4.")
    decoder: str = setting(help="The expert whose images show each layer: one that decodes (ae:PATH, sdvae).")
    data: str = setting(help="Image dataset both read.")
    data_root: Path | None = setting(None, "Where the dataset lives (folder, coco, hf, ...); shapes needs none.")
    data_options: dict = setting(default_factory=dict, flag="--data-option",
                                 help="A dataset option, repeatable: e.g. seed=1 (shapes).")
    limit: int | None = setting(None, "Only the first N items (the stores of an earlier extraction with the same "
                                      "limit are reused).", min=1)
    shards: Path = setting(Path("shards"), "Root of the stores: each layer's and the decoder's go to "
                                           "SHARDS/<data>/<expert>@<layer>/, views to SHARDS/<name>/.")
    out: Path | None = setting(None, "Folder of the diagnosis: diagnosis.png, diagnosis.json and each layer's run "
                                     "(runs/<layer>/).  [default: diagnoses/<expert folder name>]")
    translator: str = setting("coupling", "The kind of every layer's translator.",
                              choices=("coupling", "continuous"))
    steps: int = setting(1500, "Training steps of each layer's translator.", min=1)
    train_options: dict = setting(default_factory=dict, flag="--train-option",
                                  help="An n2n-train option for every layer's run, repeatable: e.g. n_flows=6, "
                                       "hidden_dim=128, batch_size=256.")
    reference: bool = setting(True, "Also translate the decoder's own latent: a row that keeps everything.")
    inputs: int = setting(200, "Held-out inputs whose samples are scored.", min=1)
    samples: int = setting(8, "Samples per input and layer.", min=2)
    rows: int = setting(6, "Held-out inputs drawn in diagnosis.png.", min=1)
    shown: int = setting(3, "Samples per layer drawn in diagnosis.png.", min=1)
    judge: Path | None = setting(None, "The shapes judge's folder (trained there where missing).  [default: "
                                       "experts/judge-shapes]")
    expert_weights: Path | None = setting(None, "Local weights of the expert (its --weights).")
    decoder_weights: Path | None = setting(None, "Local weights of the decoder (its --weights).")
    expert_options: dict = setting(default_factory=dict, flag="--expert-option",
                                   help="An option of the expert's family, repeatable (n2n-extract's --expert-option).")
    decoder_options: dict = setting(default_factory=dict, flag="--decoder-option",
                                    help="An option of the decoder's family, repeatable: e.g. size=256 (sdvae).")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    seed: int = setting(0, "Seed of the samples.", min=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if isinstance(self.layers, str):
            self.layers = [layer.strip() for layer in self.layers.split(",") if layer.strip()]
        if len(self.layers) < 2:
            raise DiagnoseError(f"--layers {','.join(self.layers) or '(none)'}: give at least 2 layers to compare, "
                                "comma-separated (e.g. block1,logits)")
        twice = sorted({layer for layer in self.layers if self.layers.count(layer) > 1})
        if twice:
            raise DiagnoseError(f"--layers names {', '.join(twice)} more than once; name each layer once")
        if self.shown > self.samples:
            raise DiagnoseError(f"--shown {self.shown} is more than --samples {self.samples}: the figure draws "
                                "samples that are scored; lower --shown or raise --samples")
        if "@" in self.expert.rsplit("/", 1)[-1].rsplit(":", 1)[-1]:
            raise DiagnoseError(f"--expert {self.expert}: give the expert without a layer; --layers names them")


def diagnose(expert: str | None = None, layers: list[str] | str | None = None, decoder: str | None = None,
             data: str | None = None, *, config: str | os.PathLike | None = None, progress: bool = True,
             console: Console | None = None, **options: Any) -> dict:
    """Diagnose ``expert``'s ``layers`` through ``decoder``'s images on dataset ``data``; the report that
    ``diagnosis.json`` holds (``out`` in it names the folder).

    ``options`` are ``DiagnoseConfig``'s fields, n2n-diagnose's options (``limit``, ``steps``,
    ``translator``, ``train_options``, ``samples``, ...), each checked before anything runs; ``config``: a
    YAML file of them, which keyword arguments override. A rerun reuses every complete store and run.
    """
    given = {"expert": expert, "layers": layers, "decoder": decoder, "data": data, **options}
    _, (settings,) = load_options(config, given, DiagnoseConfig)
    for name in ("expert", "layers", "decoder", "data"):
        if settings.get(name) is None:
            raise DiagnoseError(f"no {name} to diagnose: give one ({name}=...), or a config file that names it")
    cfg = DiagnoseConfig(**settings)
    console = console or Console(stderr=True, quiet=not progress)
    source, target = check_experts(cfg)
    out = cfg.out or Path("diagnoses") / source.name
    cfg = replace(cfg, out=out)
    stores = extract_stores(cfg, source, target, console)
    runs = train_runs(cfg, stores, console)
    report, shown = score(cfg, runs, console)
    report["figure"] = str(diagnosis_figure(report, shown, out / "diagnosis.png"))
    write_json_atomic(out / "diagnosis.json", report)
    return report


# ---------------------------------------------------------------- checks, before anything is written


def check_experts(cfg: DiagnoseConfig) -> tuple[Expert, Expert]:
    """Both experts loaded and checked: every layer the expert has, a decoder that decodes, a dataset with
    images that both read."""
    try:
        dataset = open_dataset(cfg.data, cfg.data_root, "train", **cfg.data_options)
    except DatasetError as err:
        raise DiagnoseError(str(err)) from err
    source = load_expert(cfg.expert, cfg.expert_weights, options=cfg.expert_options)
    missing = [layer for layer in cfg.layers if layer not in source.layers]
    if missing:
        raise DiagnoseError(f"expert {cfg.expert} has no layer {', '.join(missing)}; its layers: "
                            f"{', '.join(source.layers)}")
    target = load_expert(cfg.decoder, cfg.decoder_weights, options=cfg.decoder_options)
    if not target.can_decode:
        raise DiagnoseError(f"--decoder {cfg.decoder} cannot decode latents into images; give a generator "
                            "(ae:PATH, sdvae)")
    for role, expert in (("expert", source), ("decoder", target)):
        if expert.modality not in dataset.modalities:
            raise DiagnoseError(f"--{role} {expert.spec} reads {expert.modality!r} but dataset {cfg.data} has "
                                f"{', '.join(dataset.modalities)}")
    return source, target


# ---------------------------------------------------------------- stores and runs


def extract_stores(cfg: DiagnoseConfig, source: Expert, target: Expert, console: Console) -> dict[str, Path]:
    """{layer: its store, REFERENCE and "decoder": the decoder's}: every layer from one pass of the expert,
    the decoder's once; complete stores are reused."""
    common = {"data": cfg.data, "data_root": cfg.data_root, "data_options": cfg.data_options, "limit": cfg.limit,
              "out": cfg.shards, "device": cfg.device}
    console.print(f"[bold]extract[/] {source.name}: {', '.join(cfg.layers)} (one pass)")
    layers = run_extraction(ExtractConfig(expert=cfg.expert, layers=list(cfg.layers), weights=cfg.expert_weights,
                                          expert_options=cfg.expert_options, **common), console)["stores"]
    console.print(f"[bold]extract[/] {target.name} (the decoder)")
    decoder = run_extraction(ExtractConfig(expert=cfg.decoder, weights=cfg.decoder_weights,
                                           expert_options=cfg.decoder_options, **common), console)["stores"][0]
    stores = {layer: Path(path) for layer, path in zip(cfg.layers, layers, strict=True)}
    if cfg.reference:
        stores[REFERENCE] = Path(decoder)
    return {**stores, "decoder": Path(decoder)}


def train_runs(cfg: DiagnoseConfig, stores: dict[str, Path], console: Console) -> dict[str, Path]:
    """{layer: its run folder}: a translator per layer into the decoder's store; a finished run is kept, an
    interrupted one resumed."""
    from n2n.train.api import train

    decoder, rows = stores["decoder"], [layer for layer in stores if layer != "decoder"]
    runs = {}
    for i, layer in enumerate(rows, 1):
        out = cfg.out / "runs" / layer
        view = pair(stores[layer], decoder)
        console.print(f"[bold]train[/] {layer} ({i}/{len(rows)}): {view.path.name} -> {out}")
        options = {"steps": cfg.steps, "translator": cfg.translator, "seed": cfg.seed, **cfg.train_options}
        resume = (out / CHECKPOINT).exists()
        train(view, out, resume=resume or None, device=cfg.device, console=console, **options)
        runs[layer] = out
    return runs


# ---------------------------------------------------------------- what each layer keeps


def run_nll(run: Path) -> dict:
    """The run's best held-out NLL and its linear-Gaussian floor, bits/dim."""
    meta = read_meta(run / CHECKPOINT)
    best = (meta.get("best") or {}).get("heldout_bpd", meta.get("heldout_bpd"))
    return {"heldout_bpd": best, "linear_gaussian_bpd": meta.get("linear_gaussian_bpd"), "step": meta["step"]}


def held_out_keys(run: Path, count: int) -> np.ndarray:
    """The first ``count`` keys every layer's run held out (the split is by key hash, the same in each)."""
    meta = read_meta(run / CHECKPOINT)
    _, join, held = split_pairs(run_view(meta, run), meta["train"]["holdout"])
    keys = np.unique(join.key[held].astype(str))
    if not len(keys):
        raise DiagnoseError(f"{run} held out no pairs: raise the runs' holdout (--train-option holdout=0.05)")
    return keys[:count]


def source_rows(store_path: Path, keys: np.ndarray) -> torch.Tensor:
    """The latents [len(keys), dim] a store holds for ``keys`` (one row per key: image experts)."""
    store = open_store(store_path)
    where = {str(key): row for row, key in enumerate(store.keys)}
    missing = [str(key) for key in keys if str(key) not in where]
    if missing:
        raise DiagnoseError(f"{store_path} has no row for key {missing[0]}: extract it again with --overwrite")
    return torch.from_numpy(store.latents()[[where[str(key)] for key in keys]].astype(np.float32))


def attribute_reader(store_path: Path) -> tuple[Any, dict | None, dict | None]:
    """(read, truth, values): the dataset scorer's ``read_decoded``, the attributes extraction recorded per
    key, and each attribute's values; (None, None, None) where the dataset cannot read images back."""
    from n2n.evaluate.api import read_attributes

    store = open_store(store_path)
    cls, _ = dataset_class(store.meta["dataset"]["name"])
    scorer = cls.translation_scorer()
    read = getattr(scorer, "read_decoded", None)
    truth = read_attributes(store_path)
    if read is None or truth is None:
        return None, None, None
    values = reopen_dataset(store.meta["dataset"]).attribute_values()
    return read, truth, values


def kept_and_free(readings: dict[str, list[str]], truth: list[dict], values: dict[str, list[str]],
                  samples: int) -> dict[str, dict[str, float]]:
    """Per attribute: *kept*, the share of samples read as their input's value; *free*, the mean over inputs
    of the readings' normalised entropy over a perfect sampler's (``uniform_entropy``)."""
    scores = {}
    for attr in readings:
        if attr not in values:
            continue
        read = np.array(readings[attr]).reshape(len(truth), samples)
        wanted = np.array([str(t[attr]) for t in truth])
        perfect = uniform_entropy(len(values[attr]), samples)
        scores[attr] = {"kept": float((read == wanted[:, None]).mean()),
                        "free": float(np.mean([normalized_entropy(list(r), len(values[attr])) for r in read])
                                      / perfect)}
    return scores


def chance(truth: list[dict], attributes: list[str]) -> dict[str, float]:
    """Kept by chance: how often a draw from the inputs' own values equals an input's (sum of squared shares)."""
    out = {}
    for attr in attributes:
        _, counts = np.unique([str(t[attr]) for t in truth], return_counts=True)
        out[attr] = float(((counts / counts.sum()) ** 2).sum())
    return out


@torch.no_grad()
def score(cfg: DiagnoseConfig, runs: dict[str, Path], console: Console) -> tuple[dict, dict[str, torch.Tensor]]:
    """The report: each layer's NLL and, where attributes can be read, its kept and free. And the figure's
    samples: {layer: images [rows, shown, 3, H, W]}, the first of those scored."""
    from n2n.parallel import pick_device
    from n2n.translate.pipeline import Translator, run_stores

    device = pick_device(cfg.device, error=DiagnoseError)
    keys = held_out_keys(next(iter(runs.values())), cfg.inputs)
    layers, shown = {}, {}
    read = truth = values = None
    for i, (layer, run) in enumerate(runs.items(), 1):
        console.print(f"[bold]score[/] {layer} ({i}/{len(runs)}): {len(keys)} held-out inputs x {cfg.samples} "
                      "samples")
        translator = Translator.load(run, device=device, console=console)
        source_store, target_store = run_stores(translator.trained.meta, run)
        if read is None:
            read, truth, values = attribute_reader(target_store)
        latents = translator.sample(source_rows(source_store, keys), n=cfg.samples, seed=cfg.seed)
        entry = {**run_nll(run), "dim": translator.trained.flow.cond_dim, "run": str(run), "store": str(source_store)}
        if read is not None:
            readings = read(translator.target, latents.reshape(-1, latents.shape[-1]), cfg.judge, console)
            entry["attributes"] = kept_and_free(readings, [truth[str(k)] for k in keys], values, cfg.samples)
        layers[layer] = entry
        shown[layer] = translator.decode(latents[: cfg.rows, : cfg.shown])
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "out": str(cfg.out), "inputs": len(keys), "samples": cfg.samples, "layers": layers,
              "keys": [str(k) for k in keys[: cfg.rows]], "decoder_store": str(target_store)}
    if read is not None:
        report["chance"] = chance([truth[str(k)] for k in keys], list(next(iter(layers.values()))["attributes"]))
    return report, shown
