"""sdvae[:hub-id-or-path][@latent]: Stable Diffusion's autoencoder (diffusers' AutoencoderKL), encoding and decoding.

Layer "latent" = the posterior mean of the encoder, shifted and scaled as the diffusion models see it
(``(mean - shift_factor) * scaling_factor``; shift_factor is 0 unless the config has one, as the
SD3 / Flux VAEs do), flattened to [B, C * h * w]; ``decode`` undoes the scaling and runs the decoder.
Images are resized (shorter side, bicubic, antialias) and centre-cropped to ``size`` x ``size``, then
scaled to [-1, 1]. The one option, ``size`` (``--expert-option size=64``), sets the image size and so
the latent's: h = w = size / 8 for SD, so 256 px gives 4 x 32 x 32 = 4096 dims and 64 px gives 256.

Weights: the hub (``stabilityai/sd-vae-ft-mse`` by default, or its cache offline), or ``--weights
PATH``: a folder in diffusers' save_pretrained layout (config.json + diffusion_pytorch_model.safetensors),
or a whole Stable Diffusion pipeline folder, whose vae/ subfolder is used. diffusers is an optional
extra: ``pip install 'n2n[diffusers]'``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torchvision import transforms

from n2n.extract.experts import Expert, ExpertError, first_line, folder_name, missing_weights, rgb

DEFAULT_MODEL = "stabilityai/sd-vae-ft-mse"
DEFAULT_SIZE = 256
CLASS = "AutoencoderKL"
LOCAL_FILES = "a diffusers AutoencoderKL folder: config.json + diffusion_pytorch_model.safetensors"
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)?")


def _diffusers():
    """diffusers' AutoencoderKL, or the one-line error that says how to install the extra."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ExpertError("sdvae needs diffusers: pip install 'n2n[diffusers]'") from err
    return AutoencoderKL


def _read_config(folder: Path) -> dict | None:
    """``folder/config.json`` as a dict; None where there is none."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExpertError(f"sdvae: cannot read {file}: {first_line(err)}") from err
    return config if isinstance(config, dict) else {}


def _kind(config: dict) -> str:
    """What a config describes, in a word: its diffusers class, else its transformers model type."""
    architectures = config.get("architectures") or [None]
    return str(config.get("_class_name") or config.get("model_type") or architectures[0] or "non-diffusers")


def _wrong_type(path: str, config: dict) -> ExpertError:
    return ExpertError(f"sdvae: {path} holds a {_kind(config)} model, not an {CLASS}; pass the folder of a diffusers "
                       f"{CLASS} (e.g. the vae/ subfolder of a Stable Diffusion checkpoint)")


def _local(path: Path) -> tuple[Path, dict]:
    """The folder holding the AutoencoderKL (``path`` itself or its vae/ subfolder) and its config."""
    if not path.is_dir():
        raise ExpertError(f"sdvae: {path} is not a folder; pass {LOCAL_FILES}")
    configs = {folder: _read_config(folder) for folder in (path, path / "vae")}
    for folder, config in configs.items():
        if config is not None and config.get("_class_name") == CLASS:
            return folder, config
    config = configs[path] or configs[path / "vae"] or _index(path)
    if config is None:
        raise ExpertError(f"sdvae: {path} has no config.json; pass {LOCAL_FILES} (diffusers' save_pretrained "
                          "layout), or a Stable Diffusion folder with such a vae/ subfolder")
    raise _wrong_type(str(path), config)


def _index(path: Path) -> dict | None:
    """A pipeline folder's model_index.json (it has no config.json of its own)."""
    file = path / "model_index.json"
    try:
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    except (OSError, ValueError):
        return None


def _hub(autoencoder, hub_id: str) -> tuple[str | None, dict]:
    """(subfolder, config) of a hub repo: its root if that is an AutoencoderKL, else its vae/ (a
    pipeline repo). A config neither online nor in the hub cache is ``missing_weights``."""
    try:
        config, reason = _hub_config(autoencoder, hub_id, None), None
    except (OSError, ValueError) as err:
        config, reason = None, first_line(err).rstrip(".")
    if config is not None and config.get("_class_name") == CLASS:
        return None, config
    try:
        vae = _hub_config(autoencoder, hub_id, "vae")
    except (OSError, ValueError) as err:
        if config is not None:
            raise _wrong_type(hub_id, config) from err
        raise missing_weights("sdvae", hub_id, LOCAL_FILES, reason) from err
    if vae.get("_class_name") != CLASS:
        raise _wrong_type(f"{hub_id} (vae/)", vae)
    return "vae", vae


@contextmanager
def _quiet_hub():
    """Without the warning that diffusers' hub calls raise: it passes huggingface_hub an argument that
    the hub has deprecated, which says nothing to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
        yield


def _hub_config(autoencoder, hub_id: str, subfolder: str | None) -> dict:
    with _quiet_hub():
        return dict(autoencoder.load_config(hub_id, subfolder=subfolder))


def _factor(config: dict) -> int:
    """How many pixels one latent position spans per side: one halving per encoder block but the last."""
    return 2 ** (len(config.get("block_out_channels") or (0,)) - 1)


def _check_size(size: object, factor: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < factor or size % factor:
        raise ExpertError(f"sdvae: --expert-option size={size} must be a positive multiple of {factor} "
                          f"(the VAE's downsampling), e.g. size={DEFAULT_SIZE}")
    return size


def _network(autoencoder, source: str, subfolder: str | None, what: str, hub_id: str | None) -> torch.nn.Module:
    """The AutoencoderKL with every weight from ``source``: a folder without weights, or weights that
    leave parameters uninitialised, are errors (diffusers would only warn and run with random ones)."""
    if hub_id is None and not any(Path(source).glob("diffusion_pytorch_model*")):
        raise ExpertError(f"sdvae: {what} has a config.json but no weights (diffusion_pytorch_model.safetensors); "
                          f"expected {LOCAL_FILES}")
    try:
        with _quiet_hub():
            vae, info = autoencoder.from_pretrained(source, subfolder=subfolder, torch_dtype=torch.float32,
                                                    low_cpu_mem_usage=False, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        if hub_id is not None and isinstance(err, OSError):  # not downloadable, not in the cache
            raise missing_weights("sdvae", hub_id, LOCAL_FILES, first_line(err).rstrip(".")) from err
        raise ExpertError(f"sdvae: cannot load {what}: {first_line(err).rstrip('.')}; expected {LOCAL_FILES}") from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ExpertError(f"sdvae: the weights of {what} leave {len(missing)} parameters of the {CLASS} unset "
                          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); expected {LOCAL_FILES}")
    return vae.float()


class SDVAEExpert(Expert):
    """Layer "latent" = the scaled posterior mean, flattened; ``decode`` = the VAE's decoder."""

    modality = "image"
    can_decode = True

    def __init__(self, base_spec: str, name: str, weights: str, network: torch.nn.Module, size: int,
                 layer: str | None) -> None:
        config = network.config
        self.size = size
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        side = size // _factor(dict(config))
        self.latent_shape = (int(config.latent_channels), side, side)
        self.transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
        dim = self.latent_shape[0] * side * side
        super().__init__(base_spec, name, weights, network, ("latent",), {"latent": dim}, layer)

    def rows(self, item: dict) -> list[torch.Tensor]:
        return [self.transform(rgb(item["image"]))]

    def collate(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": torch.stack(rows)}

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self.device, torch.float32)
        mean = self.network.encode(x).latent_dist.mean
        return {"latent": ((mean - self.shift_factor) * self.scaling_factor).flatten(1)}

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, size, size] in [0, 1]."""
        with torch.inference_mode():
            z = latent.to(self.device, torch.float32).reshape(-1, *self.latent_shape)
            x = self.network.decode(z / self.scaling_factor + self.shift_factor).sample
            return ((x.float() + 1) / 2).clamp(0, 1)

    def preprocess(self) -> dict:
        return {"image_size": self.size, "resize": "shorter side, bicubic, antialias", "crop": "center",
                "range": [-1, 1], "latent": "posterior mean", "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "latent_shape": list(self.latent_shape)}


def load(model: str | None, layer: str | None, weights: str | None, size: int = DEFAULT_SIZE) -> SDVAEExpert:
    """sdvae[:hub-id-or-path][@latent]; ``weights`` (a local folder) replaces the model's source;
    ``size`` is the image size (a multiple of the VAE's downsampling, 8 for Stable Diffusion's)."""
    autoencoder = _diffusers()
    hub_id = model or DEFAULT_MODEL
    source = weights or hub_id
    if Path(source).exists():
        folder, config = _local(Path(source))
        size = _check_size(size, _factor(config))
        network = _network(autoencoder, str(folder), None, str(folder), None)
        recorded = str(folder)
    elif _HUB_ID.fullmatch(source) and not source.startswith("."):
        subfolder, config = _hub(autoencoder, source)
        size = _check_size(size, _factor(config))
        network = _network(autoencoder, source, subfolder, source, source)
        recorded = source
    else:
        raise ExpertError(f"sdvae: no such folder {source}; pass {LOCAL_FILES}, or a hub id such as {DEFAULT_MODEL}")
    name = f"sdvae-{folder_name(Path(hub_id).name)}-{size}px"
    return SDVAEExpert(f"sdvae:{hub_id}", name, recorded, network, size, layer)
