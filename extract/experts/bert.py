"""bert[:hub-id-or-path][@pool]: BERT-family text experts (transformers AutoModel + AutoTokenizer).

Layers: "mean" (masked mean of the last hidden state), "cls" (its first token) and "layerN" (masked
mean of hidden state N, 0 = the embeddings). Masking the pad tokens in the pooling (attention
already ignores them) keeps a caption's latent independent of the other captions in its batch.

A sentence-transformers checkpoint (modules.json beside the weights) is read the way that library
reads it: its max_seq_length, its pooling as the default layer, and that layer L2-normalised where
the pipeline ends in Normalize. So ``minilm`` yields all-MiniLM-L6-v2's sentence embeddings exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from n2n.extract.experts import Expert, ExpertError, first_line, folder_name, missing_weights

DEFAULT_MODEL = "bert-base-uncased"
LOCAL_FILES = "a folder with config.json, the model weights and the tokenizer files"


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens that ``mask`` keeps (as sentence-transformers pools), in float32."""
    weight = mask.unsqueeze(-1).float()
    return (hidden.float() * weight).sum(1) / weight.sum(1).clamp(min=1e-9)


class TextExpert(Expert):
    """A transformer encoder over captions: one row per caption, tokenised in the loader workers."""

    modality = "text"

    def __init__(self, base_spec: str, name: str, weights: str, model: torch.nn.Module, tokenizer, layer: str | None,
                 *, max_length: int, pool: str, normalize: bool) -> None:
        depth, width = model.config.num_hidden_layers, model.config.hidden_size
        poolings = ("mean", "cls", *(f"layer{n}" for n in range(depth + 1)))
        layers = (pool, *(other for other in poolings if other != pool))  # the checkpoint's own pooling first
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalized = pool if normalize else None
        super().__init__(base_spec, name, weights, model, layers, dict.fromkeys(layers, width), layer)

    def rows(self, item: dict) -> list[str]:
        text = item["text"]
        return [text] if isinstance(text, str) else list(text)

    def collate(self, rows: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(rows, padding="longest", truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self.network(**batch, output_hidden_states=any(layer.startswith("layer") for layer in layers))
        mask = batch["attention_mask"]
        latents = {}
        for layer in layers:
            if layer == "cls":
                latent = out.last_hidden_state[:, 0].float()
            elif layer == "mean":
                latent = masked_mean(out.last_hidden_state, mask)
            else:
                latent = masked_mean(out.hidden_states[int(layer.removeprefix("layer"))], mask)
            latents[layer] = F.normalize(latent, dim=-1) if layer == self.normalized else latent
        return latents

    def preprocess(self) -> dict:
        vocab = json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode()
        return {"tokenizer": type(self.tokenizer).__name__, "vocab_digest": hashlib.sha256(vocab).hexdigest()[:16],
                "max_length": self.max_length, "padding": "longest", "normalized": self.normalized}


def _read_json(source: str, filename: str) -> dict | list | None:
    """``filename`` of a local folder or hub repo (or its cache), None where the checkpoint has none."""
    from transformers.utils import cached_file

    path = cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(path).read_text(encoding="utf-8")) if path else None


def _sentence_transformers(source: str) -> tuple[int | None, str, bool]:
    """(max_seq_length, pooled layer, L2-normalised?) of a sentence-transformers checkpoint; defaults otherwise."""
    modules = _read_json(source, "modules.json")
    if not modules:
        return None, "mean", False
    paths = {module["type"].rsplit(".", 1)[-1]: module["path"] for module in modules}
    pooling = _read_json(source, f"{paths['Pooling']}/config.json") if "Pooling" in paths else None
    pool = "cls" if (pooling or {}).get("pooling_mode_cls_token") else "mean"
    max_length = (_read_json(source, "sentence_bert_config.json") or {}).get("max_seq_length")
    return max_length, pool, "Normalize" in paths


def build(base_spec: str, name: str, source: str, hub_id: str, layer: str | None) -> TextExpert:
    """A text expert from ``source`` (a local folder, or a hub id resolved through the hub cache)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise ExpertError(f"{base_spec}: cannot load {source}: {first_line(err)}; expected {LOCAL_FILES}") from err
        raise missing_weights(base_spec, hub_id, LOCAL_FILES, first_line(err)) from err
    max_length, pool, normalize = _sentence_transformers(source)
    limits = (max_length, tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None))
    return TextExpert(base_spec, name, source, model, tokenizer, layer, max_length=min(n for n in limits if n),
                      pool=pool, normalize=normalize)


def load(model: str | None, layer: str | None, weights: str | None) -> TextExpert:
    """bert[:hub-id-or-path][@pool]; ``weights`` (a local folder) replaces the model's source."""
    hub_id = model or DEFAULT_MODEL
    name = "bert" if hub_id == DEFAULT_MODEL else f"bert-{folder_name(Path(hub_id).name)}"
    return build(f"bert:{hub_id}", name, weights or hub_id, hub_id, layer)
