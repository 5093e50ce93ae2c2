"""timm:<model>[@layer]: any timm image model, frozen, preprocessed with its own data config.

Layers: "pool" (default) = the pooled pre-logits features, "stageK" = the global-average-pooled
feature map of stage K (K indexes the model's ``feature_info``; its module names, e.g. "layer3" of a
ResNet, are accepted in the spec too). Stage features let one ask which invariances a depth has learnt (the
paper's layer-wise diagnosis); all requested layers come from one forward pass.

Weights: the hub when online (``create_model(pretrained=True)``, or its cache offline), else
``--weights``: a state-dict file (safetensors, or .pth/.bin loaded with ``weights_only=True``) or a
folder holding one, both loaded by timm itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from n2n.extract.experts import Expert, ExpertError, first_line, folder_name, missing_weights, rgb

LOCAL_FILES = "a state-dict file (.safetensors, .pth, .bin) or a folder holding model.safetensors or pytorch_model.bin"


def _create(model: str, weights: str | None) -> torch.nn.Module:
    """The timm model with its weights, or an ExpertError that says how to supply them."""
    import timm
    from timm.models import parse_model_name, split_model_name_tag

    source, name = parse_model_name(model)
    if source is None and not timm.is_model(split_model_name_tag(name)[0]):
        close = timm.list_models(f"*{split_model_name_tag(name)[0]}*")[:8]
        raise ExpertError(f"timm has no model {model!r}" + (f"; close: {', '.join(close)}" if close else "")
                          + " (see timm.list_models())")
    try:
        if weights is None:
            return timm.create_model(model, pretrained=True)
        if Path(weights).is_dir():
            return timm.create_model(model, pretrained=True,
                                     pretrained_cfg_overlay={"file": weights, "source": "local-dir"})
        return timm.create_model(model, checkpoint_path=weights)
    except OSError as err:
        if weights is None:
            raise missing_weights("timm", model, LOCAL_FILES, first_line(err)) from err
        raise ExpertError(f"timm:{model}: cannot read --weights {weights}: {first_line(err)}") from err
    except RuntimeError as err:  # no pretrained weights for this model, or a state dict that does not fit it
        hint = "pass --weights PATH" if weights is None else f"--weights {weights} does not fit {model}"
        raise ExpertError(f"timm:{model}: {first_line(err)}; {hint} ({LOCAL_FILES})") from err


class TimmExpert(Expert):
    """A timm image model; rows are images transformed as the model was trained to see them."""

    modality = "image"

    def __init__(self, model: str, weights: str | None, layer: str | None) -> None:
        from timm.data import create_transform, resolve_data_config

        network = _create(model, weights)
        info = network.feature_info if hasattr(network, "forward_intermediates") else []
        stages = [f"stage{k}" for k in range(len(info))]
        aliases = {entry["module"]: stage for entry, stage in zip(info, stages, strict=True)}
        dims = {"pool": getattr(network, "head_hidden_size", None) or network.num_features,
                **{stage: entry["num_chs"] for stage, entry in zip(stages, info, strict=True)}}
        self.data_config = resolve_data_config(model=network)
        self.transform = create_transform(**self.data_config)
        cfg = network.pretrained_cfg
        source = weights or cfg.get("hf_hub_id") or cfg.get("url") or model
        super().__init__(f"timm:{model}", f"timm-{folder_name(model)}", source, network, ("pool", *stages),
                         dims, aliases.get(layer, layer))

    def rows(self, item: dict) -> list[torch.Tensor]:
        return [self.transform(rgb(item["image"]))]

    def collate(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": torch.stack(rows)}

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        x = batch["image"]
        stages = sorted({int(layer.removeprefix("stage")) for layer in layers if layer != "pool"})
        if stages:
            features, maps = self.network.forward_intermediates(x, indices=stages, intermediates_only=False)
            pooled = {f"stage{k}": m.float().mean(dim=(2, 3)) for k, m in zip(stages, maps, strict=True)}
        else:
            features, pooled = self.network.forward_features(x), {}
        if "pool" in layers:
            pooled["pool"] = self.network.forward_head(features, pre_logits=True)
        return pooled

    def preprocess(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.data_config.items()}


def load(model: str | None, layer: str | None, weights: str | None) -> TimmExpert:
    """timm:<model>[@layer]."""
    if not model:
        raise ExpertError("timm needs a model name: timm:<model>[@layer], e.g. timm:resnet50 or timm:resnet50@stage3")
    return TimmExpert(model, weights, layer)
