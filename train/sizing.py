"""Defaults that fit the view: the size of a translator that its options leave open, from its train pairs.

net2net's sizes (24 blocks of width 1024: 106M parameters for 384 -> 32 dims) suit its BERT -> BigGAN
recipe on a GPU, where some 100,000 pairs of 268-dim targets give 27M target values to fit. For a view
of one's own they can be far off: 1,283 pairs of 32-dim targets (41,000 values) got those 106M
parameters, memorised the train pairs (train NLL -0.86, held-out 42.5 bits/dim against the law's 2.58)
and ran at 1.3 steps/s on a CPU, 40 minutes for 3,000 steps, without a word.

So a size a user does not give is the largest of a ladder whose parameters stay within PARAMS_PER_VALUE
per train target value (pairs x target dims): 4 puts the demo's text -> image view (37,905 pairs of 32
dims, whose config pins 8 affine blocks of 192: 4.2M) at 8 glow blocks of 256 (2.6M), a view of 1,283
such pairs at 4 blocks of 64 (163k), and a recipe of net2net's size and data at net2net's size. A size
given (an option, a config file, a recipe) is kept, and the rest sized around it.
"""

from __future__ import annotations

import dataclasses

import torch

from n2n.cinn import FlowConfig, build_flow

PARAMS_PER_VALUE = 4
# Coupling translators: (n_flows, hidden_dim), smallest first; the last is net2net's.
COUPLING_SIZES = ((2, 32), (4, 64), (4, 128), (8, 128), (8, 192), (8, 256), (12, 384), (16, 512), (24, 768),
                  (24, 1024))
VELOCITY_WIDTHS = (32, 64, 128, 256, 512)  # continuous translators' velocity nets; 512 was the fixed default


def parameters(dim: int, cond_dim: int, config: FlowConfig) -> int:
    """Parameters of the translator ``config`` builds for these sizes (built on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_flow(dim, cond_dim, config).parameters())


def sized(config: FlowConfig, dim: int, cond_dim: int, train_pairs: int) -> tuple[FlowConfig, str | None]:
    """``config`` with the sizes it leaves open (None) chosen for ``train_pairs`` pairs of ``dim``-dim
    targets given ``cond_dim``-dim sources, and a line saying what was chosen (None where nothing was open)."""
    if config.translator == "continuous":
        names, ladder = ("velocity_width",), [(w,) for w in VELOCITY_WIDTHS]
    else:
        names, ladder = ("n_flows", "hidden_dim"), list(COUPLING_SIZES)
    given = {name: getattr(config, name) for name in names if getattr(config, name) is not None}
    if len(given) == len(names):
        return config, None
    budget = PARAMS_PER_VALUE * train_pairs * dim
    chosen, count = None, 0
    for candidate in dict.fromkeys(tuple(given.get(n, v) for n, v in zip(names, sizes, strict=True))
                                   for sizes in ladder):
        trial = dataclasses.replace(config, **dict(zip(names, candidate, strict=True)))
        n = parameters(dim, cond_dim, trial)
        if chosen is None or n <= budget:
            chosen, count = trial, n
        if n > budget:
            break
    said = " ".join(f"--{name.replace('_', '-')} {getattr(chosen, name)}" for name in names if name not in given)
    return chosen, (f"sized to the view: {said} ({count:,} parameters for {train_pairs:,} train pairs x {dim} "
                    f"dims, at most {PARAMS_PER_VALUE} a target value; give a size to choose another)")
