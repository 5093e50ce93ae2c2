"""Experts: frozen networks addressed by a spec string ``name[:model][@layer]``.

The ``name`` is a family, found through ``n2n.plugins`` (kind "expert", entry-point group
``n2n.experts``). n2n's own families (ae, bert, biggan, classifier, clip, label, minilm, sdvae, timm) are
entry points of n2n's pyproject.toml like anyone's, so there is one path, and a family is imported only when
a spec names it: listing experts or reporting a bad spec never pays for importing transformers, timm or
BigGAN.

What a plug-in implements:

- a subclass of ``Expert`` (its docstring is the contract), and
- ``load(model: str | None, layer: str | None, weights: str | None, **options) -> Expert``, declared as
  ``[project.entry-points."n2n.experts"] myenc = "mypkg.experts:load"`` (or, in a running process,
  ``n2n.register_expert("myenc", load)``). ``model`` is the spec's text after ':', ``layer`` after
  '@', ``weights`` the ``--weights`` path; each is None when not given. ``options`` are the user's
  ``--expert-option KEY=VALUE`` pairs (``expert_options=`` in the API), as keyword arguments: a
  family that takes some declares them as keyword parameters with defaults (sdvae: ``size=256``) and
  checks their range; one that takes none leaves them out. Raise ``ExpertError`` for anything the
  user can fix (a missing folder, an unknown model, a size out of range): its message is shown as it is.

``load_expert`` checks the contract where a family is used: a loader that fails to import or
returns something other than an ``Expert`` is an ``ExpertError`` naming the distribution and the
entry point. Every expert it returns knows the distribution that provided it (``plugin``); stores
record it in ``identity()``, so a run rebuilt where that distribution is missing says what to install.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console

from n2n import plugins
from n2n.errors import N2NError

# The model part is lazy so that a path keeps any '@' that is not followed by a bare layer name at the end.
_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_-]+)(?::(?P<model>.+?))?(?:@(?P<layer>[A-Za-z0-9_+-]+))?")  # label@color+shape


class ExpertError(N2NError):
    """A spec, layer, weights or plug-in problem the user can fix; the one-line message says how."""


def known_experts() -> list[str]:
    """The family names a spec may start with (installed plug-ins and n2n's own), sorted."""
    return plugins.names("expert")


def load_expert(spec: str, weights: str | Path | None = None, plugin: str | None = None,
                options: dict | None = None) -> Expert:
    """The frozen expert named by ``spec`` (``"name[:model][@layer]"``), in eval mode on the CPU.

    ``weights`` (the CLI's ``--weights PATH``) is a local folder or file that replaces the model's
    usual source; without it weights come from the hub (or its local cache when offline).
    ``plugin`` is the distribution a store recorded for the family ("mypkg 0.1"): where the family
    is not installed, the error then names what to install instead of listing the known families.
    ``options`` (``--expert-option KEY=VALUE``) go to the family's loader as keyword arguments;
    one it does not take is an error naming those it does. Stores record them, so a run's expert is
    rebuilt with the same ones.
    """
    match = _SPEC.fullmatch(spec.strip())
    try:
        found = plugins.find("expert", match["name"]) if match else None
        load = found.load() if found else None
    except plugins.PluginError as err:  # an import failure or a name claimed twice
        raise ExpertError(str(err)) from err
    if found is None:
        raise ExpertError(_unknown(spec, match["name"] if match else None, plugin))
    if weights is not None and not Path(weights).exists():
        raise ExpertError(f"--weights {weights}: no such file or folder")
    if not callable(load):
        raise ExpertError(f"expert {match['name']!r}: the {found.where} is not callable ({type(load).__name__}); "
                          "it must be a function load(model, layer, weights) -> n2n.Expert")
    options = dict(options or {})
    _check_options(match["name"], load, options)
    expert = load(match["model"], match["layer"], None if weights is None else str(weights), **options)
    if not isinstance(expert, Expert):
        raise ExpertError(f"expert {match['name']!r}: the {found.where} returned a {type(expert).__name__}, "
                          "not an n2n.Expert")
    expert.plugin, expert.options = found.dist, options
    return expert


def stored_layer(identity: dict, expert: Expert) -> str:
    """The layer of ``expert`` that the store of ``identity`` (a store's or a run side's record) holds."""
    return (identity.get("expert") or {}).get("layer") or expert.layers[0]


def expert_of(identity: dict, side: str, weights: Path | None, console: Console | None = None,
              store: Path | None = None) -> Expert:
    """Load the expert that wrote one side's store; ``weights`` overrides where its weights come from.

    Without it, the weights are looked for where extraction found them, then (a moved or copied
    project folder) where they lie relative to the store's current folder ``store``.
    """
    info = identity.get("expert") or {}
    spec = info.get("spec")
    if not spec:
        raise ExpertError(f"the {side} store {identity.get('path')} names no expert (a synthetic store?); "
                          "nothing to encode or decode with")
    candidates = [Path(info["weights"])] if info.get("weights") else []
    if store is not None and info.get("weights_from_store"):
        candidates.append(Path(os.path.normpath(Path(store) / info["weights_from_store"])))
    source = weights or next((c for c in candidates if c.exists()), None)
    try:
        expert = load_expert(spec, source, plugin=info.get("plugin"), options=info.get("options"))
    except ExpertError as e:
        hint = "" if "install" in str(e) or "register" in str(e) else f" (give its weights with --{side}-weights PATH)"
        raise ExpertError(f"{side} expert {spec}: {e}{hint}") from e
    if info.get("digest") and expert.identity()["digest"] != info["digest"] and console is not None:
        console.print(f"[yellow]warning: the {side} expert's weights differ from those its store was extracted "
                      f"with ({spec}); translations may be off")
    return expert


def _check_options(family: str, load: object, options: dict) -> None:
    """Refuse options the family's loader does not take, naming those it does (its keyword parameters
    after model, layer and weights)."""
    try:
        params = list(inspect.signature(load).parameters.values())[3:]
    except (TypeError, ValueError):  # a builtin or C callable: let the call itself decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    taken = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(taken))
    if unknown:
        accepted = f"it takes {', '.join(taken)}" if taken else "it takes none"
        raise ExpertError(f"expert {family!r} has no option {', '.join(unknown)} (--expert-option); {accepted}")


def _unknown(spec: str, name: str | None, plugin: str | None) -> str:
    """Why ``spec`` names no installed family, and what to do: install the recorded distribution, or
    pick a known family."""
    if name and plugin == plugins.IN_PROCESS:
        return (f"expert family {name!r} of {spec!r} was registered in the process that wrote its store; "
                f"call n2n.register_expert({name!r}, load) first")
    if name and plugin:
        return (f"expert family {name!r} of {spec!r} is not installed; its store was written with it from "
                f"{plugin}: install that distribution (pip install {plugin.split()[0]})")
    return (f"unknown expert {spec!r}; known experts: {', '.join(known_experts())} "
            "(spec: name[:model][@layer])")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def missing_weights(family: str, hub_id: str, local: str, reason: str) -> ExpertError:
    """The error for weights that are neither local nor downloadable: it names both ways to give them."""
    return ExpertError(f"{family}: no weights for {hub_id!r} ({reason}); pass --weights PATH ({local}), "
                       f"or go online so that {hub_id!r} can be downloaded")


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line, for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def folder_name(text: str) -> str:
    """``text`` made safe as one folder name (store dirs are named after experts)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "expert"


def rgb(image: Image.Image) -> Image.Image:
    """An item's image as RGB: datasets may hand over greyscale or RGBA pictures."""
    return image if image.mode == "RGB" else image.convert("RGB")


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) over the state dict: sorted names, dtypes, shapes and tensor bytes.

    It changes with any weight and not with the device, so a store can tell which weights wrote it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


class Expert(ABC):
    """A frozen network that turns dataset items into latents, and (generators) latents into images.

    The contract of an expert, built-in or plug-in. Extraction calls ``rows`` and ``collate`` in
    DataLoader worker processes (so they must be picklable and touch no device) and ``encode`` in
    the main process on the device; a store must not depend on the batch size or the worker count,
    so a row's latent must not depend on the other rows of its batch (pool under the padding mask,
    use GroupNorm rather than BatchNorm). A subclass

    - sets ``modality``: the item field it reads ("image", "text", or a dataset's own, like "biggan");
      extraction refuses a dataset that lacks it. ``can_decode = True`` for a generator;
    - calls ``__init__`` with ``base_spec`` (its spec without the layer, e.g. "bert:prajjwal1/bert-tiny"),
      ``name`` (the store folder), ``weights`` (where the weights came from, recorded), ``network``
      (a ``torch.nn.Module`` holding every weight: it is frozen, moved by ``to`` and digested by
      ``identity``), ``layers`` (all it can give, the default first), ``dims`` ({layer: dim}) and
      ``layer`` (the spec's, or None);
    - implements ``rows(item)``: the inputs of one item, one per latent row (a list of captions
      gives one row each; the row's position is the store's ``sub``);
    - implements ``collate(rows)``: rows of several items as a dict of CPU tensors;
    - implements ``forward(batch, layers)``: {layer: [rows, dims[layer]]} for each requested layer,
      from one pass of the network over ``batch`` (already moved to the device). ``encode`` calls it
      under inference mode after checking the layers, and casts to float32;
    - implements ``preprocess()``: the JSON-able settings that shape the network's inputs (image
      size, tokenizer, normalisation), recorded in every store so that latents made from
      differently prepared inputs never pair;
    - generators implement ``decode(latent)``: images [B, 3, H, W] in [0, 1];
    - an expert whose latents share a space with another's (CLIP's two towers) overrides ``space``;
    - an expert whose latents depend on the dataset's vocabulary (``label``) overrides ``bound_to``.

    ``identity`` is not overridden: it adds the weights' digest and the providing distribution.
    """

    modality: str
    can_decode: bool = False
    plugin: str | None = None  # the distribution that provided the family ("n2n 0.1.0"), set by load_expert
    options: dict = {}  # the --expert-option values it was loaded with, set by load_expert (never mutated)

    def __init__(self, base_spec: str, name: str, weights: str, network: torch.nn.Module,
                 layers: Sequence[str], dims: dict[str, int], layer: str | None = None) -> None:
        self.network = network.eval().requires_grad_(False)
        self.name = name
        self.weights = weights
        self.dims = dict(dims)
        self.spec_layer = layer  # the layer the spec named, if any: it then names the store folder too
        chosen = layer or layers[0]
        if chosen not in layers:
            raise ExpertError(f"expert {base_spec} has no layer {chosen!r}; its layers: {', '.join(layers)}")
        self.layers = (chosen, *(other for other in layers if other != chosen))
        self.spec = f"{base_spec}@{chosen}"

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device: torch.device | str) -> Expert:
        self.network.to(device)
        return self

    @abstractmethod
    def rows(self, item: dict) -> list:
        """The inputs of one item, one entry per output row (``sub`` = position in the list)."""

    @abstractmethod
    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        """Rows of several items batched into tensors (CPU, in a loader worker)."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The network's latents for each of ``layers`` (already checked), called under inference mode."""

    @abstractmethod
    def preprocess(self) -> dict:
        """The settings that shape the network's inputs (recorded in every store)."""

    def encode(self, batch: dict[str, torch.Tensor], layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """{layer: [rows, dims[layer]] float32} for each of ``layers`` (default: ``layers[0]``), from one pass."""
        layers = tuple(layers or self.layers[:1])
        unknown = [layer for layer in layers if layer not in self.layers]
        if unknown:
            raise ExpertError(f"expert {self.spec} has no layer {', '.join(unknown)}; "
                              f"its layers: {', '.join(self.layers)}")
        with torch.inference_mode():
            out = self.forward(batch, layers)
        return {layer: out[layer].float() for layer in layers}

    def encode_items(self, items: Sequence[dict], layer: str | None = None) -> torch.Tensor:
        """[len(items), dims[layer]] float32 on the expert's device: each dataset-like item's first row, batched
        and encoded as extraction encodes a batch (``layer``: the first by default). How inputs that are not in
        a store (a caption to translate, an edited one) get the latent their store would hold."""
        layer = layer or self.layers[0]
        batch = {k: v.to(self.device) for k, v in self.collate([self.rows(item)[0] for item in items]).items()}
        return self.encode(batch, [layer])[layer]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from latents; only generators (sdvae, biggan, ae) can."""
        raise ExpertError(f"expert {self.spec} cannot decode: it has no generator (generators: sdvae, biggan, ae)")

    def bound_to(self, dataset: object) -> Expert:
        """This expert as it reads ``dataset`` (an ``ItemDataset``); extraction calls it once the dataset is
        open. The default: itself. The ``label`` expert takes the dataset's values of its attributes here
        (and records them as its options, so that its store rebuilds it)."""
        return self

    def space(self, layer: str) -> str | None:
        """The embedding space ``layer``'s latents lie in where another expert's latents lie in it too and
        compare with them directly (CLIP's projected text and image embeddings: one space, one name);
        None for a space of the expert's own. Each store records it; n2n-eval then scores the source latent
        itself as a translator into a target of the same space, the baseline a translator must beat."""
        return None

    def identity(self) -> dict:
        """What makes two stores' latents comparable (spec, weights source and digest, preprocessing),
        and the distribution that provides the family, so a store says what to install to rebuild it.
        The loader's options are recorded only where given: stores of experts without any stay as they were."""
        options = {"options": dict(self.options)} if self.options else {}
        return {"spec": self.spec, "weights": self.weights, "digest": weights_digest(self.network),
                "preprocess": self.preprocess(), **options, "plugin": self.plugin}


__all__ = ["Expert", "ExpertError", "expert_of", "known_experts", "load_expert", "stored_layer"]


def save_model_folder(module: torch.nn.Module, config: dict, path: str | Path, weights: str = "model.safetensors",
                      config_name: str = "config.json") -> Path:
    """Write a model n2n trains itself (an autoencoder expert, the shapes judge) as a folder of
    safetensors weights + JSON config, atomically: a sibling temp folder, then a rename. A folder
    cannot be renamed over another, so an older save is moved aside first and removed after."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_model(module, str(tmp / weights))
        (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
