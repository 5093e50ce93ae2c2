"""biggan: items sampled for the BigGAN generator (net2net's text-to-BigGAN recipe).

Item i is drawn from (seed, split, i) alone: z = a standard normal truncated to |z| <= 2 (values
outside are redrawn, as the package's ``truncnorm(-2, 2)``) times ``truncation``, and an ImageNet
class. Modalities: "biggan" (z and class: what the ``biggan`` expert stores exactly), "label" (the
class), "text" (a caption from the class name by a template, so ``bert``/``minilm`` over the same
keys gives the source side of text-to-BigGAN) and, with ``render=True``, "image" (rendered by the
generator, loaded lazily once per loader worker).

With ``captioner="blip:<hub-id-or-path>"`` the "text" of an item is instead what an image captioner
says of the generator's image of it, as net2net made its text -> BigGAN data. Extraction renders and
captions the items once, on its device, before a text expert reads them (``prepare``), into a cache
beside the stores (``shards/biggan/captions/``, see ``captions.py``): the text store and the BigGAN
store of the same items join by key, and another text expert over them captions nothing again.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from n2n.extract.datasets import DatasetError, ItemDataset, ItemError, check_option
from n2n.extract.datasets.captions import BlipCaptioner, CaptionCache, parse_captioner
from n2n.extract.experts import Expert, weights_digest

Z_DIM = 128
Z_BOUND = 2.5  # net2net samples z from a normal truncated at |z| <= 2.5
TEMPLATES = ("a photo of {a} {name}", "a picture of {a} {name}", "an image of {a} {name}",
             "a close-up photo of {a} {name}", "a photo of the {name}")


@cache
def class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names BigGAN was trained on, first synonym each ("tench, Tinca tinca" -> "tench")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes()))


def caption(class_index: int, template: int) -> str:
    name = class_names()[class_index]
    return TEMPLATES[template].format(a="an" if name[0].lower() in "aeiou" else "a", name=name)


def parse_classes(classes: str | int | Sequence[int] | None) -> list[int]:
    """The ImageNet classes to draw from: all 1000 by default, else one, a list or "1,207,980"."""
    if classes is None:
        return list(range(1000))
    rule = f"dataset biggan: option classes = {classes!r} must be ImageNet class indices in 0..999 " \
           "(--data-option classes=1,207,980)"
    if isinstance(classes, int):  # one class: the command line reads "classes=207" as a number
        classes = [classes]
    try:
        chosen = [int(c) for c in (classes.split(",") if isinstance(classes, str) else classes)]
    except (TypeError, ValueError) as e:
        raise DatasetError(rule) from e
    if not chosen or not all(0 <= c < 1000 for c in chosen):
        raise DatasetError(rule)
    return chosen


class BigGANDataset(ItemDataset):
    """Deterministic BigGAN inputs (z, class), their captions and, on request, their images."""

    name = "biggan"

    def __init__(self, root: str | Path | None = None, split: str = "train", seed: int = 0, count: int = 10000,
                 classes: str | int | Sequence[int] | None = None, truncation: float = 0.4,
                 model: str = "biggan-deep-128", weights: str | Path | None = None, render: bool = False,
                 captioner: str | None = None) -> None:
        from n2n.extract.experts.biggan import MODELS

        super().__init__(None, split)  # nothing is read from disk: a root given out of habit is not recorded
        if not split:
            raise DatasetError("biggan needs a split name (it seeds the items), e.g. train or val")
        check_option(self.name, "seed", seed, integer=True, min=0)
        check_option(self.name, "count", count, integer=True, min=1)
        check_option(self.name, "truncation", truncation, above=0, max=1)
        check_option(self.name, "model", model, choices=MODELS)
        if captioner is not None:
            parse_captioner(captioner)  # a bad spec fails here, before anything is rendered
        self.classes = parse_classes(classes)
        self.captioner = captioner
        self._captions: CaptionCache | None = None  # set by prepare()
        self.seed, self.count = int(seed), int(count)
        self.truncation, self.model, self.weights = float(truncation), model, weights
        self.modalities = ("biggan", "label", "text", *(("image",) if render else ()))
        self._generator = None  # loaded on the first rendered image, in the process (worker) that renders

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return f"biggan-{self.split}-{self.check_index(index):07d}"

    def draw(self, index: int) -> tuple[np.ndarray, int, int]:
        """(z float32 [128], class, template index) of item ``index``; independent of PYTHONHASHSEED."""
        rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), self.check_index(index)])
        z = rng.standard_normal(Z_DIM)
        while (outside := np.abs(z) > Z_BOUND).any():
            z[outside] = rng.standard_normal(int(outside.sum()))
        class_index = self.classes[int(rng.integers(len(self.classes)))]
        return (z * self.truncation).astype(np.float32), class_index, int(rng.integers(len(TEMPLATES)))

    def generator(self, device: torch.device | str = "cpu") -> Expert:
        """The ``biggan`` expert that renders this dataset's items, loaded once per process."""
        if self._generator is None:
            from n2n.extract.experts import load_expert

            self._generator = load_expert(f"biggan:{self.model}", self.weights)
        return self._generator.to(device)

    def render(self, indices: Sequence[int], device: torch.device | str = "cpu") -> list[Image.Image]:
        """The generator's images of items ``indices`` at the dataset's truncation, in one batch."""
        expert = self.generator(device)
        draws = [self.draw(index) for index in indices]
        latent = expert.encode_items([{"z": z, "class": class_index} for z, class_index, _ in draws], "latent")
        images = (expert.decode(latent, self.truncation).permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
        return [Image.fromarray(image) for image in images]

    def prepare(self, indices: range, workdir: Path, device: torch.device, console: Console) -> None:
        """With a captioner and "text" selected: caption the items of ``indices`` that the cache in
        ``workdir`` lacks (rendering each once on ``device``), so that items read their captions from it."""
        if self.captioner is None or "text" not in self.modalities:
            return
        cache = CaptionCache(workdir, self.captioner, self.describe_items())
        todo = cache.todo(indices, self.count)
        if todo:
            with Progress(TextColumn("captioning {task.fields[what]}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=console, transient=True) as bar:
                task = bar.add_task("", total=todo, what=f"{self.name} with {self.captioner}")
                cache.fill(indices, self.count, lambda batch: self.render(batch, device),
                           lambda: BlipCaptioner(cache.source, device), lambda n: bar.advance(task, n),
                           digests=lambda: {"generator": weights_digest(self.generator(device).network)})
            console.print(f"captioned {todo} {self.name} items into {cache.folder}")
        self._generator = None  # loader workers never render: do not ship the generator to them
        self._captions = cache

    def text(self, index: int, template: int, class_index: int) -> list[str]:
        """The captions of item ``index``: the captioner's (cached by ``prepare``) or the class-name template's."""
        if self.captioner is None:
            return [caption(class_index, template)]
        if self._captions is None:
            raise DatasetError(f"biggan with captioner={self.captioner}: captions are made by extraction (n2n-extract)"
                               "; from Python call dataset.prepare(range(n), workdir, device, console) first")
        text = self._captions.caption(index)
        if not text:
            raise ItemError(self.key(index), f"the captioner gave an empty caption for item {index}")
        return [text]

    def __getitem__(self, index: int) -> dict:
        z, class_index, template = self.draw(index)
        item = {"key": self.key(index)}
        if "biggan" in self.modalities:
            item["z"], item["class"] = z, class_index
        if "label" in self.modalities:
            item["label"] = class_index
        if "text" in self.modalities:
            item["text"] = self.text(index, template, class_index)
        if "image" in self.modalities:
            item["image"] = self.render([index])[0]
        return item

    @property
    def classes_described(self) -> list[int] | str:
        return "all" if self.classes == list(range(1000)) else self.classes

    def describe_items(self) -> dict:
        """What decides the items (z, class, and so their images): the key of their caption cache."""
        return {"name": self.name, "split": self.split, "seed": self.seed, "classes": self.classes_described,
                "truncation": self.truncation, "model": self.model}

    def describe(self) -> dict:
        captioner = {"captioner": self.captioner} if self.captioner else {}
        return {**super().describe(), "seed": self.seed, "classes": self.classes_described,
                "truncation": self.truncation, "model": self.model, **captioner}
