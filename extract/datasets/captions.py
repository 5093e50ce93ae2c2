"""Captions made by an image captioner, once per item, cached in a folder beside the stores.

net2net's text -> BigGAN data was not "a photo of a <class>": it rendered BigGAN samples and
captioned them with an image captioner, then embedded the captions. ``CaptionCache`` keeps such
captions for one dataset configuration in chunk files of ``CHUNK`` items, each written atomically
when all its items are captioned, so

- a crash loses at most the chunk being captioned, and a rerun makes only the missing chunks;
- re-extraction with another text expert (or the BigGAN store of the same items) captions nothing;
- any number of processes (torchrun ranks) may fill disjoint ranges of one cache.

The cache folder is named by a digest of everything that decides a caption (the captioner spec,
the decoding settings, and the dataset's own description of its items), and records the digests
of the weights that wrote it: a later run with other weights refuses to mix captions.

Captioners are addressed like experts, ``family:<hub-id-or-path>``; the one family is ``blip``
(transformers' ``BlipForConditionalGeneration``, greedy decoding so captions are deterministic).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from n2n.extract.datasets import DatasetError
from n2n.extract.experts import first_line, folder_name, hub_offline, weights_digest
from n2n.files import write_text_atomic

CHUNK = 256  # items per cache file: the most captioning a crash can cost
INFO = "captions.json"
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
DECODING = {"num_beams": 1, "do_sample": False, "max_new_tokens": 30}  # greedy: deterministic captions
LOCAL_FILES = "a folder with BLIP's config.json, weights, image processor and tokenizer files (save_pretrained)"


def parse_captioner(spec: str) -> tuple[str, str]:
    """(family, hub id or path) of ``blip[:<hub-id-or-path>]``; a DatasetError names the form otherwise."""
    family, _, source = str(spec).partition(":")
    if family != "blip":
        raise DatasetError(f"captioner {spec!r}: unknown captioner family {family!r}; known: blip "
                           "(--data-option captioner=blip:<hub-id-or-path>)")
    return family, source or DEFAULT_BLIP


class BlipCaptioner:
    """transformers' BLIP image captioning, unconditional and greedy: images -> one caption each."""

    def __init__(self, source: str, device: torch.device) -> None:
        from transformers import AutoConfig, AutoProcessor, BlipForConditionalGeneration

        self.source = source
        try:
            model_type = AutoConfig.from_pretrained(source).model_type
            if model_type != "blip":
                raise DatasetError(f"captioner blip:{source} holds a {model_type!r} model, not BLIP; pass a "
                                   "BLIP image-captioning folder or hub id")
            model, info = BlipForConditionalGeneration.from_pretrained(source, dtype=torch.float32,
                                                                        output_loading_info=True)
            self.processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            where = "" if Path(source).exists() or hub_offline() else " (or go online so it can be downloaded)"
            raise DatasetError(f"captioner blip:{source}: cannot load it: {first_line(err)}; expected "
                               f"{LOCAL_FILES}{where}") from err
        if info["missing_keys"]:
            raise DatasetError(f"captioner blip:{source} lacks {len(info['missing_keys'])} weights, e.g. "
                               f"{sorted(info['missing_keys'])[0]}; pass a complete BLIP captioning checkpoint")
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = device

    def digest(self) -> str:
        return weights_digest(self.model)

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            tokens = self.model.generate(pixel_values=inputs["pixel_values"], **DECODING)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]


class CaptionCache:
    """The captions of one dataset configuration under ``root/captions/<name>``, chunk by chunk."""

    def __init__(self, root: Path, captioner: str, items: dict) -> None:
        """``root``: the folder of the dataset's stores (a local path or a store URL's UPath)."""
        family, source = parse_captioner(captioner)
        self.captioner, self.source = captioner, source
        self.config = {"captioner": f"{family}:{source}", "decoding": DECODING, "items": items, "chunk": CHUNK}
        key = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:10]
        self.folder = root / "captions" / f"{folder_name(f'{family}-{Path(source).name}')}-{key}"
        self._chunks: dict[int, list[str]] = {}  # read chunks, per process

    def chunk_path(self, start: int) -> Path:
        return self.folder / f"{start:09d}.json"

    def missing(self, indices: range) -> list[int]:
        """Starts of the chunks that hold some of ``indices`` and are not on disk yet."""
        starts = range(indices.start // CHUNK * CHUNK, indices.stop, CHUNK) if len(indices) else range(0)
        return [start for start in starts if not self.chunk_path(start).is_file()]

    def todo(self, indices: range, count: int) -> int:
        """How many items ``fill`` would caption: those of the missing chunks (of ``count`` items in all)."""
        return sum(min(start + CHUNK, count) - start for start in self.missing(indices))

    def fill(self, indices: range, count: int, render: Callable[[list[int]], list[Image.Image]],
             load_captioner: Callable[[], BlipCaptioner], progress: Callable[[int], None], batch_size: int = 32,
             digests: Callable[[], dict] = dict) -> int:
        """Caption every missing chunk that holds some of ``indices`` (of ``count`` items): ``render``
        turns item indices into images. Returns the number of items captioned."""
        missing = self.missing(indices)
        if not missing:
            return 0
        captioner = load_captioner()
        self._check_weights({"captioner": captioner.digest(), **digests()})
        done = 0
        for start in missing:
            chunk = list(range(start, min(start + CHUNK, count)))
            captions = []
            for batch in _batches(chunk, batch_size):
                captions += captioner(render(batch))
                progress(len(batch))
            write_text_atomic(self.chunk_path(start), json.dumps({"start": start, "captions": captions}))
            done += len(chunk)
        return done

    def caption(self, index: int) -> str:
        """The cached caption of item ``index``; a DatasetError if its chunk was never made."""
        start = index // CHUNK * CHUNK
        if start not in self._chunks:
            path = self.chunk_path(start)
            if not path.is_file():
                raise DatasetError(f"no caption of item {index} in {self.folder}: extraction makes the captions "
                                   "first (n2n-extract); from Python call dataset.prepare(...) before reading items")
            self._chunks[start] = json.loads(path.read_text(encoding="utf-8"))["captions"]
        return self._chunks[start][index - start]

    def _check_weights(self, digests: dict) -> None:
        """Record the weights' digests on the first write; refuse to add captions made by other weights."""
        info = self.folder / INFO
        self.folder.mkdir(parents=True, exist_ok=True)
        if info.is_file():
            recorded = json.loads(info.read_text(encoding="utf-8"))["weights"]
            if recorded != digests:
                raise DatasetError(f"{self.folder} holds captions made with other weights ({recorded}, now "
                                   f"{digests}); delete that folder to caption again with these")
            return
        write_text_atomic(info, json.dumps({**self.config, "weights": digests}, indent=2) + "\n")


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
