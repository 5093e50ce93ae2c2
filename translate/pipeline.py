"""A trained run as a translator: source input -> source expert -> cINN sample -> target expert.

The checkpoint names both stores, and each store names the expert (spec, weights, digest) that
wrote it, so a run folder alone is enough to rebuild the whole pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from n2n.errors import N2NError
from n2n.extract.experts import Expert, ExpertError, load_expert
from n2n.train.checkpoint import TrainedFlow, load_run


class TranslateError(N2NError):
    """Bad input for a run (wrong modality, empty text); the message names it and the fix."""


def expert_of(identity: dict, side: str, weights: Path | None, console: Console | None = None) -> Expert:
    """Load the expert that wrote one side's store; ``weights`` overrides where its weights come from."""
    info = identity.get("expert") or {}
    spec = info.get("spec")
    if not spec:
        raise TranslateError(f"the {side} store {identity.get('path')} names no expert (a synthetic store?); "
                             "nothing to encode or decode with")
    source = weights or (Path(info["weights"]) if info.get("weights") and Path(info["weights"]).exists() else None)
    try:
        expert = load_expert(spec, source)
    except ExpertError as e:
        raise ExpertError(f"{side} expert {spec}: {e} (give its weights with --{side}-weights PATH)") from e
    if info.get("digest") and expert.identity()["digest"] != info["digest"] and console is not None:
        console.print(f"[yellow]warning: the {side} expert's weights differ from those its store was extracted "
                      f"with ({spec}); translations may be off")
    return expert


@dataclass
class Pipeline:
    flow: TrainedFlow
    source: Expert
    target: Expert
    source_layer: str
    run: Path

    @torch.no_grad()
    def encode(self, items: list[dict]) -> torch.Tensor:
        """Source latents [len(items), cond_dim], one per item (its first caption / its image)."""
        rows = [self.source.rows(item)[0] for item in items]
        batch = {k: v.to(self.source.device) for k, v in self.source.collate(rows).items()}
        return self.source.encode(batch, [self.source_layer])[self.source_layer].float().cpu()

    @torch.no_grad()
    def sample(self, source: torch.Tensor, n: int, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
        """n target latents per source row: [len(source), n, dim]; reproducible from the seed."""
        generator = torch.Generator().manual_seed(seed)
        repeated = source.repeat_interleave(n, dim=0)
        latents = self.flow.sample(repeated, temperature, generator)
        return latents.view(len(source), n, -1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [..., 3, H, W] in [0, 1] from target latents [..., dim]."""
        if not self.target.can_decode:
            raise TranslateError(f"the target expert {self.target.spec} has no decoder; write latents with "
                                 "--out latents.npy instead of an image")
        flat = latents.reshape(-1, latents.shape[-1]).to(self.target.device)
        images = self.target.decode(flat).float().cpu()
        return images.view(*latents.shape[:-1], *images.shape[1:])


def load_pipeline(run: Path, source_weights: Path | None = None, target_weights: Path | None = None,
                  console: Console | None = None) -> Pipeline:
    """Rebuild translator and both experts from a run folder (CPU)."""
    translator = load_run(run)
    meta = translator.meta
    source = expert_of(meta["source"], "source", source_weights, console)
    target = expert_of(meta["target"], "target", target_weights, console)
    layer = (meta["source"].get("expert") or {}).get("layer") or source.layers[0]
    return Pipeline(translator, source, target, layer, Path(run))
