"""A trained run as a translator: source input -> source expert -> translator sample -> target expert.

The checkpoint names both stores, and each store names the expert (spec, weights, digest) that
wrote it, so a run folder alone is enough to rebuild the whole pipeline.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console

from n2n.errors import N2NError
from n2n.extract.experts import Expert, expert_of, stored_layer
from n2n.options import check_fields, setting
from n2n.shards.view import view_stores
from n2n.train.checkpoint import TrainedFlow, run_view
from n2n.translate import hub


class TranslateError(N2NError):
    """Bad input for a run (wrong modality, empty text); the message names it and the fix."""


@dataclass(frozen=True)
class SamplingConfig:
    """How a translator samples; each field is an n2n-translate option and a keyword argument of
    ``Translator.sample`` and ``Translator.translate``, with the same default."""

    n: int = setting(8, "Samples per input.", min=1)
    temperature: float = setting(1.0, "z ~ N(0, T^2 I): lower is more typical, less diverse (a continuous translator "
                                      "below 1 also stops its path at t = T and predicts its end: 0 is a "
                                      "regression's answer).", min=0)
    seed: int = setting(0, "Seed of the samples: the same seed gives the same output.", min=0)
    steps: int | None = setting(None, "ODE solver steps of a continuous translator: fewer are faster, more follow "
                                      "its paths closer.  [default: the run's --ode-steps]", min=1)
    guidance: float = setting(1.0, "Classifier-free guidance scale of a continuous translator trained with "
                                   "--cond-dropout: above 1 follows the caption more, at the cost of diversity.",
                              min=0)

    def __post_init__(self) -> None:
        check_fields(self)


class Translator:
    """A trained run, ready to use: inputs -> source expert -> translator samples -> target expert.

    ``Translator.load(run)`` rebuilds both experts from the identities their stores recorded in the
    run (spec, weights, digest), so the run folder alone is enough. Inputs are what the source
    expert reads: captions (``str``) for a text expert, images (PIL images or image files) for an
    image expert. Samples are reproducible from ``seed``.
    """

    def __init__(self, trained: TrainedFlow, source: Expert, target: Expert, source_layer: str, run: Path) -> None:
        self.trained, self.source, self.target, self.source_layer, self.run = trained, source, target, source_layer, run

    @property
    def flow(self) -> TrainedFlow:
        """Deprecated name of ``trained`` (it read ``translator.flow.flow`` for the network)."""
        warnings.warn("Translator.flow is deprecated: use Translator.trained (its network: .trained.flow)",
                      DeprecationWarning, stacklevel=2)
        return self.trained

    @classmethod
    def load(cls, run: str | os.PathLike, *, source_weights: str | os.PathLike | None = None,
             target_weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
             console: Console | None = None, checkpoint: str = "best") -> Translator:
        """The run's flow and both experts on ``device``; ``*_weights`` replace where an expert's
        weights come from (a local copy, when they are not where its store says). ``run``: a run folder,
        a checkpoint file, a saved translator's folder (``save_pretrained``) or its Hugging Face Hub id.
        ``checkpoint``: a run folder's best weights (best.safetensors, its best held-out NLL; the last
        where it has none) or its ``last`` (checkpoint.safetensors)."""
        run = hub.locate(run)
        trained = hub.load(run, device, checkpoint)
        meta = trained.meta
        stores = run_stores(meta, run)
        source = expert_of(meta["source"], "source", _path(source_weights), console, stores[0]).to(device)
        target = expert_of(meta["target"], "target", _path(target_weights), console, stores[1]).to(device)
        layer = stored_layer(meta["source"], source)
        return cls(trained, source, target, layer, run)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | None = None,
                        **options: object) -> Translator:
        """``load`` with the Hub's keywords (transformers' and diffusers' spelling): a Hub id, downloaded at
        ``revision`` into ``cache_dir`` (or found there with HF_HUB_OFFLINE=1), or a local folder.
        ``options``: ``load``'s (``source_weights``, ``target_weights``, ``device``)."""
        return cls.load(hub.locate(name_or_path, revision=revision, cache_dir=cache_dir, token=token), **options)

    def save_pretrained(self, folder: str | os.PathLike, *, license: str = "other") -> Path:
        """Write this translator as a Hub model folder: model.safetensors, config.json and a README.md model
        card (with the run's n2n-eval table where it was scored); ``from_pretrained(folder)`` loads it."""
        return hub.save(self.trained, self.run, folder, license)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    license: str = "other", commit_message: str = "Upload n2n translator") -> str:
        """Upload the ``save_pretrained`` folder to the Hub repo ``repo_id`` (created if missing, through
        ``huggingface_hub``; log in first: ``huggingface-cli login`` or ``token=``); the commit's URL."""
        return hub.push(self.trained, self.run, repo_id, private=private, token=token, license=license,
                    commit_message=commit_message)

    def items(self, inputs: Sequence[object], side: str = "source") -> list[dict]:
        """Dataset-like items for the ``side`` ("source" or "target") expert; an input of the wrong kind is a
        TranslateError."""
        if isinstance(inputs, str | Image.Image | os.PathLike):
            inputs = [inputs]
        if not len(inputs):
            raise TranslateError("nothing to translate: give one or more inputs")
        expert = self.source if side == "source" else self.target
        modality = expert.modality
        items = []
        for value in inputs:
            if modality == "text" and isinstance(value, str) and value.strip():
                items.append({"text": [value.strip()]})
            elif modality == "image" and isinstance(value, Image.Image):
                items.append({"image": value.convert("RGB")})
            elif modality == "image" and isinstance(value, str | os.PathLike):
                items.append({"image": read_image(Path(value))})
            elif modality == "attributes" and isinstance(value, dict) and value:
                items.append({"attributes": value})
            elif modality == "attributes" and isinstance(value, str) and value.strip():
                items.append({"attributes": expert.parse(value)})  # a label as written: "square", "shape=square"
            else:
                wanted = {"text": "a non-empty caption (str)", "image": "an image (PIL image or file path)",
                          "attributes": "a label (a dict, or text such as 'square' or 'shape=square')"}.get(
                              modality, f"what it reads ({modality})")
                raise TranslateError(f"input {str(value)[:60]!r}: the run's {side} expert {expert.spec} reads "
                                     f"{modality}; give {wanted}")
        return items

    @torch.no_grad()
    def encode(self, inputs: Sequence[object] | torch.Tensor, side: str = "source") -> torch.Tensor:
        """Latents of the ``side`` expert [len(inputs), dim], one per input (a caption / an image), or
        ``inputs`` themselves where they are latents already (checked to be that side's size)."""
        expert = self.source if side == "source" else self.target
        layer = self.source_layer if side == "source" else self.target_layer
        dim = self.trained.flow.cond_dim if side == "source" else self.trained.flow.dim
        if isinstance(inputs, torch.Tensor):
            if inputs.ndim != 2 or inputs.shape[1] != dim:
                raise TranslateError(f"{side} latents of shape {tuple(inputs.shape)}: this run's {side} latents are "
                                     f"[N, {dim}] ({expert.spec}); give latents of its {side} store, or its inputs")
            return inputs.float()
        return expert.encode_items(self.items(inputs, side), layer)

    @property
    def target_layer(self) -> str:
        """The target expert's layer the run's target store holds."""
        return stored_layer(self.trained.meta["target"], self.target)

    # --- the residual: what a target holds that its source does not say ------------------------------------

    @torch.no_grad()
    def residual(self, targets: Sequence[object] | torch.Tensor, sources: Sequence[object] | torch.Tensor,
                 steps: int | None = SamplingConfig.steps) -> torch.Tensor:
        """v [N, dim], one per (target, source) pair: what each target holds that its source does not explain
        (for text -> image, what a caption leaves open: where, how large). ``targets``: what the target expert
        reads (images for an image target) or target latents [N, dim]; ``sources``: the source expert's inputs
        (captions) or source latents, one per target. ``steps``: a continuous translator's ODE steps."""
        SamplingConfig(steps=steps)  # checked before any work
        x, c = self.encode(targets, "target"), self.encode(sources, "source")
        if len(x) != len(c):
            raise TranslateError(f"{len(x)} targets and {len(c)} sources: a residual is taken of each target under "
                                 "its own source; give one source per target")
        device = next(self.trained.flow.parameters()).device
        return self.trained.residual(x.to(device), c.to(device), steps).cpu()

    @torch.no_grad()
    def recombine(self, v: torch.Tensor, sources: Sequence[object] | torch.Tensor,
                  steps: int | None = SamplingConfig.steps, guidance: float = SamplingConfig.guidance) -> torch.Tensor:
        """Target latents [len(v), len(sources), dim]: every residual of ``v`` [N, dim] under every source,
        x' = f^-1(v | c'), so what the source names changes and what the residual holds stays.
        ``recombine(residual(x, c), c)`` gives x back: exactly (float rounding) for a coupling translator, up to
        the ODE solver's error for a continuous one."""
        dim = self.trained.flow.dim
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or v.shape[1] != dim:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise TranslateError(f"residuals of shape {shape}: this run's residuals are [N, {dim}]; take them with "
                                 "this run's Translator.residual")
        SamplingConfig(steps=steps, guidance=guidance)  # each checked, before any work
        c = self.encode(sources, "source")
        device = next(self.trained.flow.parameters()).device
        pairs_v = v.float().repeat_interleave(len(c), 0).to(device)
        pairs_c = c.repeat(len(v), 1).to(device)
        return self.trained.recombine(pairs_v, pairs_c, steps, guidance).view(len(v), len(c), -1).cpu()

    def edit(self, targets: Sequence[object] | torch.Tensor, sources_from: Sequence[object] | torch.Tensor,
             sources_to: Sequence[object] | torch.Tensor, steps: int | None = SamplingConfig.steps,
             guidance: float = SamplingConfig.guidance, decode: bool | None = None) -> torch.Tensor:
        """Each target under each new source, its residual kept: ``recombine(residual(targets, sources_from),
        sources_to)``, decoded where the target expert decodes (images [N, len(sources_to), 3, H, W] in [0, 1];
        ``decode=False``: the latents [N, len(sources_to), dim]). An exemplar works the same: its residual
        under captions that describe another picture."""
        if decode and not self.target.can_decode:
            raise TranslateError(f"the target expert {self.target.spec} has no decoder, so an edit cannot be drawn; "
                                 "ask for latents (decode=False, or n2n-translate --out edit.npy)")
        latents = self.recombine(self.residual(targets, sources_from, steps), sources_to, steps, guidance)
        return self.decode(latents) if (self.target.can_decode if decode is None else decode) else latents

    @torch.no_grad()
    def sample(self, inputs: Sequence[object] | torch.Tensor, n: int = SamplingConfig.n,
               temperature: float = SamplingConfig.temperature, seed: int = SamplingConfig.seed,
               steps: int | None = SamplingConfig.steps, guidance: float = SamplingConfig.guidance) -> torch.Tensor:
        """n target latents per input: [len(inputs), n, dim] on the CPU. ``inputs`` may also be source
        latents [B, cond_dim] already encoded. z ~ N(0, T^2 I) through the inverse flow."""
        SamplingConfig(n, temperature, seed, steps, guidance)  # each checked, before any work
        source = self.encode(inputs)
        device = next(self.trained.flow.parameters()).device
        generator = torch.Generator(device).manual_seed(seed)
        latents = self.trained.sample(source.to(device).repeat_interleave(n, dim=0), temperature, generator, steps,
                                   guidance)
        return latents.view(len(source), n, -1).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [..., 3, H, W] in [0, 1] from target latents [..., dim]."""
        if not self.target.can_decode:
            raise TranslateError(f"the target expert {self.target.spec} has no decoder; write latents "
                                 "(Translator.sample, or n2n-translate --out latents.npy) instead of images")
        flat = latents.reshape(-1, latents.shape[-1]).to(self.target.device)
        images = self.target.decode(flat).float().cpu()
        return images.view(*latents.shape[:-1], *images.shape[1:])

    def translate(self, inputs: Sequence[object], n: int = SamplingConfig.n,
                  temperature: float = SamplingConfig.temperature, seed: int = SamplingConfig.seed,
                  steps: int | None = SamplingConfig.steps, guidance: float = SamplingConfig.guidance) -> torch.Tensor:
        """Images [len(inputs), n, 3, H, W] in [0, 1]: ``n`` samples per input, decoded."""
        return self.decode(self.sample(inputs, n, temperature, seed, steps, guidance))


def run_stores(meta: dict, run: Path) -> tuple[Path | None, Path | None]:
    """Where the run's two stores are now (a moved project folder), or Nones where its view is gone:
    translating needs the experts' weights, not the stores."""
    try:
        return view_stores(run_view(meta, run))
    except N2NError:
        return None, None


def _path(value: str | os.PathLike | None) -> Path | None:
    return None if value is None else Path(value)


def read_image(path: Path) -> Image.Image:
    """An image file as RGB; an unreadable one is a TranslateError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise TranslateError(f"input {path} is not a readable image ({e})") from e
