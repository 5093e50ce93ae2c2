"""clip[:hub-id-or-path][@layer]: one tower of a CLIP model (transformers CLIPModel), frozen.

The layer picks the tower: "text" (the default) and "text-pooled" read captions, "image" and
"image-pooled" read images. "text"/"image" are the embeddings CLIP compares, the projection of the
tower's pooled output L2-normalised; "-pooled" is that pooled output before the projection. A store
holds one tower's weights only (its digest is of those), and its folder is named after the tower,
``clip-<model>-text`` / ``clip-<model>-image``, so one dataset's two stores never collide.

Inputs are prepared by the checkpoint's own tokenizer and image processor. The text tower pools the
EOS token's state under a causal mask and pads on the right, so a caption's latent does not depend
on the longer captions of its batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from n2n.extract.experts import Expert, ExpertError, first_line, folder_name, missing_weights, rgb

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
LOCAL_FILES = "a CLIPModel save_pretrained folder with its tokenizer and image processor files"
LAYERS = {
    "text": "projected text embedding (text_projection of the EOS token's state), L2-normalised",
    "text-pooled": "text model's pooled output (the EOS token's final state) before the projection",
    "image": "projected image embedding (visual_projection of the class token's state), L2-normalised",
    "image-pooled": "vision model's pooled output (the class token's post-layernorm state) before the projection",
}
# Keys of the image processor's saved settings that change pixel values (its class is recorded apart).
IMAGE_SETTINGS = ("do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                  "rescale_factor", "do_normalize", "image_mean", "image_std")


class Tower(torch.nn.Module):
    """One CLIP tower and its projection: exactly the weights a store's latents come from (and are digested)."""

    def __init__(self, model: torch.nn.Module, projection: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.projection = projection

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """The tower's pooled output (EOS token for text, class token for images)."""
        return self.model(**batch).pooler_output


class ClipExpert(Expert):
    """A CLIP tower: ``modality`` ("text" or "image") names both the item field and the layers' prefix."""

    def __init__(self, base_spec: str, name: str, weights: str, network: Tower, layer: str | None) -> None:
        tower = self.modality
        dims = {tower: network.projection.out_features, f"{tower}-pooled": network.projection.in_features}
        # The tower's own layer adds nothing to the folder name, which already says the tower.
        super().__init__(base_spec, f"{name}-{tower}", weights, network, tuple(dims), dims,
                         None if layer == tower else layer)

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        pooled = self.network(**batch)
        latents = {f"{self.modality}-pooled": pooled}
        if self.modality in layers:
            latents[self.modality] = F.normalize(self.network.projection(pooled).float(), dim=-1)
        return {layer: latents[layer] for layer in layers}

    def space(self, layer: str) -> str | None:
        """Both towers' projected layers lie in the checkpoint's one joint space; the pooled layers do not."""
        return self.spec.rsplit("@", 1)[0] if layer in ("text", "image") else None

    def described(self, settings: dict) -> dict:
        """``settings`` and what each of the tower's layers is (in one order, whichever the spec chose),
        so a store records which latent it holds."""
        layers = (self.modality, f"{self.modality}-pooled")
        return {**settings, "layers": {layer: LAYERS[layer] for layer in layers}}


class ClipTextExpert(ClipExpert):
    """CLIP's text tower: one row per caption, tokenised (right-padded, truncated) in the loader workers."""

    modality = "text"

    def __init__(self, base_spec: str, name: str, weights: str, network: Tower, tokenizer, layer: str | None) -> None:
        limits = (tokenizer.model_max_length, network.model.config.max_position_embeddings)
        self.tokenizer = tokenizer
        self.max_length = min(n for n in limits if n)
        super().__init__(base_spec, name, weights, network, layer)

    def rows(self, item: dict) -> list[str]:
        text = item["text"]
        return [text] if isinstance(text, str) else list(text)

    def collate(self, rows: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(rows, padding="longest", padding_side="right", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def preprocess(self) -> dict:
        vocab = json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode()
        return self.described({"tokenizer": type(self.tokenizer).__name__,
                               "vocab_digest": hashlib.sha256(vocab).hexdigest()[:16],
                               "max_length": self.max_length, "padding": "longest", "padding_side": "right"})


class ClipImageExpert(ClipExpert):
    """CLIP's vision tower: one row per image, prepared by the checkpoint's image processor."""

    modality = "image"

    def __init__(self, base_spec: str, name: str, weights: str, network: Tower, processor, layer: str | None) -> None:
        self.processor = processor
        super().__init__(base_spec, name, weights, network, layer)

    def rows(self, item: dict) -> list[torch.Tensor]:
        return [self.processor(images=rgb(item["image"]), return_tensors="pt")["pixel_values"][0]]

    def collate(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack(rows)}

    def preprocess(self) -> dict:
        saved = json.loads(self.processor.to_json_string())
        settings = {key: saved[key] for key in IMAGE_SETTINGS if key in saved}
        if isinstance(settings.get("resample"), int):  # PIL's number, named
            settings["resample"] = Image.Resampling(settings["resample"]).name.lower()
        return self.described({"image_processor": type(self.processor).__name__, **settings})


def _config(source: str, hub_id: str):
    """The checkpoint's config, refused before any weights load unless it is a CLIP one."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise ExpertError(f"clip: cannot load {source}: {first_line(err)}; expected {LOCAL_FILES}") from err
        raise missing_weights("clip", hub_id, LOCAL_FILES, first_line(err)) from err
    if config.model_type != "clip":
        raise ExpertError(f"clip: {source} holds a '{config.model_type}' model, not CLIP; "
                          "pass a CLIP folder (save_pretrained of CLIPModel)")
    return config


def _tower(source: str, hub_id: str, tower: str) -> Tower:
    """The ``tower`` ("text" or "image") of the CLIP at ``source`` with its projection; refused where the
    checkpoint leaves any of their weights at random."""
    from transformers import CLIPModel

    config = _config(source, hub_id)
    try:
        model, info = CLIPModel.from_pretrained(source, config=config, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        if Path(source).exists():
            raise ExpertError(f"clip: cannot load {source}: {first_line(err)}; expected {LOCAL_FILES}") from err
        raise missing_weights("clip", hub_id, LOCAL_FILES, first_line(err)) from err
    prefixes = ("text_model.", "text_projection.") if tower == "text" else ("vision_model.", "visual_projection.")
    missing = sorted(key for key in info["missing_keys"] if key.startswith(prefixes))
    if missing:
        raise ExpertError(f"clip: {source} lacks {len(missing)} weights of the {tower} tower (e.g. {missing[0]}); "
                          "pass a complete CLIP folder (save_pretrained of CLIPModel)")
    if tower == "text":
        return Tower(model.text_model, model.text_projection)
    return Tower(model.vision_model, model.visual_projection)


def _has_file(source: str, names: Sequence[str]) -> bool:
    """Whether a local folder or hub repo (or its cache) holds one of ``names``."""
    from transformers.utils import cached_file

    return any(cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) for name in names)


def _inputs(source: str, hub_id: str, tower: str):
    """The checkpoint's tokenizer (text) or image processor (image)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    what = "tokenizer" if tower == "text" else "image processor"
    try:
        if tower == "image":
            return AutoImageProcessor.from_pretrained(source)
        # Without its files AutoTokenizer builds an empty CLIPTokenizer from the config: every caption all unknown.
        if not _has_file(source, ("tokenizer.json", "vocab.json")):
            raise OSError("neither tokenizer.json nor vocab.json + merges.txt")
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        if Path(source).exists():
            raise ExpertError(f"clip: no {what} in {source}: {first_line(err)}; expected {LOCAL_FILES}") from err
        raise missing_weights("clip", hub_id, LOCAL_FILES, first_line(err)) from err


def load(model: str | None, layer: str | None, weights: str | None) -> ClipExpert:
    """clip[:hub-id-or-path][@layer]; ``weights`` (a local folder) replaces the model's source."""
    hub_id = model or DEFAULT_MODEL
    if layer is not None and layer not in LAYERS:
        raise ExpertError(f"clip:{hub_id} has no layer {layer!r}; its layers: {', '.join(LAYERS)} "
                          "(text and text-pooled read captions, image and image-pooled read images)")
    tower = "image" if layer in ("image", "image-pooled") else "text"
    source = weights or hub_id
    network = _tower(source, hub_id, tower)
    inputs = _inputs(source, hub_id, tower)
    base_spec, name = f"clip:{hub_id}", f"clip-{folder_name(Path(hub_id).name)}"
    if tower == "text":
        return ClipTextExpert(base_spec, name, source, network, inputs, layer)
    return ClipImageExpert(base_spec, name, source, network, inputs, layer)
