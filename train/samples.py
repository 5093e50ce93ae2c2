"""The picture a logger shows at each checkpoint: samples for a fixed set of held-out sources, decoded by the
target expert, so that a person watches the translator learn.

The sources are the first distinct ones of the held-out pairs (always the same ones) and the noise is
seeded, so that two checkpoints' grids differ only by what training changed. Only where the target
expert decodes (an autoencoder, the SD-VAE, BigGAN); elsewhere, or where its weights cannot be found, a
run logs curves alone after one warning.
"""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console
from torchvision.utils import make_grid

from n2n.extract.experts import Expert, ExpertError, expert_of, known_experts
from n2n.train.data import Pairs

PER_SOURCE = 4  # samples in each source's row


class SampleGrid:
    """``draw(flow)``: one row per source, ``PER_SOURCE`` samples each, as an image [3, H, W] in [0, 1]."""

    def __init__(self, expert: Expert, sources: torch.Tensor, data: Pairs) -> None:
        self.expert, self.sources, self.target_norm = expert, sources, data.target_norm

    @torch.no_grad()
    def draw(self, flow: torch.nn.Module) -> torch.Tensor:
        training = flow.training
        flow.eval()
        try:
            c = self.sources.repeat_interleave(PER_SOURCE, 0)
            generator = torch.Generator(c.device).manual_seed(0)
            latents = self.target_norm.inverse(flow.sample(c, 1.0, generator))
            images = self.expert.decode(latents.to(self.expert.device)).float().cpu()
        finally:
            flow.train(training)
        return make_grid(images.clamp(0, 1), nrow=PER_SOURCE, padding=2, pad_value=1)


def sample_grid(data: Pairs, count: int, console: Console) -> SampleGrid | None:
    """The grid of ``count`` held-out sources, or None: none asked for, none held out, or a target expert that
    does not decode or cannot be loaded (then with one warning naming why)."""
    count = min(count, len(data.held_source))
    if count == 0:
        return None
    target = data.view.target
    spec = (target.meta.get("expert") or {}).get("spec") or ""
    if spec.split(":")[0].split("@")[0] not in known_experts():
        return None  # a store of no expert this install has (a synthetic view's): nothing to decode with
    try:
        expert = expert_of(target.identity(), "target", None, None, store=target.path)
    except ExpertError as err:
        console.print(f"[yellow]warning: no sample images in the logger: {err}")
        return None
    if not expert.can_decode:
        return None
    candidates = data.held_source[: 16 * count]  # the first held-out sources, each once (five captions: one image)
    first = np.unique(candidates.cpu().numpy(), axis=0, return_index=True)[1]
    return SampleGrid(expert.to(candidates.device), candidates[np.sort(first)[:count]], data)
