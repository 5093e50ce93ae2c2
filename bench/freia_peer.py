"""The cINN against its peer: FrEIA's SequenceINN of AllInOneBlocks with the same target and
condition sizes, the same subnet (width, depth) and about as many parameters.

Blocks are matched on parameters, not on count: an AllInOneBlock is one half-coupling with one
net for both log-scale and shift, fed the raw condition; an n2n block is two half-couplings with
separate s and t nets fed a learnt embedding of the condition. Both train with the same step
(train.trainer.make_step), Adam settings, loss and batches.

- Step time at net2net size (dim 268, condition 768, hidden 1024, depth 2), batch 64 and 1024.
- Held-out NLL after the same number of steps on the same synthetic view (a Gaussian law with a
  known NLL), at a size this CPU trains in about a minute.
Run: python -m bench.freia_peer [--steps 1000]
"""

from __future__ import annotations

import math
import tempfile
import time
from functools import partial
from pathlib import Path

import click
import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

from bench.common import NET2NET, Row, interleaved, report, trainer_step
from n2n.cinn import ConditionalFlow
from n2n.cinn.flow import mlp
from n2n.shards.synthetic import write_synthetic
from n2n.train.data import PairedLatents, load_pairs
from n2n.train.trainer import heldout_bpd

SMALL = {"dim": 16, "cond_dim": 32, "n_flows": 4, "hidden_dim": 128}  # the NLL comparison's size
TARGETS = {64: 0.8, 1024: 1.0}  # n2n's step time / FrEIA's, at most
LR = 1e-3  # both models


class FreiaFlow(nn.Module):
    """A SequenceINN of AllInOneBlocks behind n2n's flow interface: (x, c) -> (z, log|det|)."""

    def __init__(self, dim: int, cond_dim: int, hidden_dim: int, hidden_depth: int, blocks: int) -> None:
        super().__init__()
        self.inn = Ff.SequenceINN(dim)
        for _ in range(blocks):
            self.inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(cond_dim,),
                            subnet_constructor=lambda c_in, c_out: mlp(c_in, hidden_dim, hidden_depth, c_out))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inn(x, c=[c])


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_freia(flow: ConditionalFlow) -> FreiaFlow:
    """The FrEIA flow whose parameter count is nearest the n2n flow's (block count solved for)."""
    args = (flow.dim, flow.cond_dim, flow.config.hidden_dim, flow.config.hidden_depth)
    per_block = parameters(FreiaFlow(*args, blocks=1))
    return FreiaFlow(*args, blocks=max(1, round(parameters(flow) / per_block)))


def step_times(batch_size: int, repeat: int) -> dict:
    """Seconds per training step of both models at net2net size."""
    torch.manual_seed(0)
    flow = ConditionalFlow.from_dict(NET2NET)
    freia = matched_freia(flow)
    x, c = torch.randn(batch_size, NET2NET["dim"]), torch.randn(batch_size, NET2NET["cond_dim"])
    steps = {name: partial(trainer_step(model.train(), lr=LR), x, c) for name, model in (("n2n", flow),
                                                                                        ("freia", freia))}
    times = interleaved(steps, repeat)  # its warm-up steps initialise n2n's ActNorm
    return {"n2n_parameters": parameters(flow), "freia_parameters": parameters(freia),
            "freia_blocks": len(freia.inn.module_list), "n2n_s": times["n2n"], "freia_s": times["freia"]}


def matched_glow(flow: ConditionalFlow) -> ConditionalFlow:
    """n2n with the glow coupling (one net per half for s and t), its block count solved so that its
    parameter count is nearest ``flow``'s."""
    spec = {**flow.to_dict(), "coupling": "glow"}
    block = parameters(ConditionalFlow.from_dict({**spec, "n_flows": 2})) - parameters(
        ConditionalFlow.from_dict({**spec, "n_flows": 1}))
    base = parameters(ConditionalFlow.from_dict({**spec, "n_flows": 1})) - block
    return ConditionalFlow.from_dict({**spec, "n_flows": max(1, round((parameters(flow) - base) / block))})


def nll_after(data: PairedLatents, steps: int, batch_size: int, seed: int = 0) -> dict:
    """Held-out NLL (bits/dim) and training seconds of each model after `steps` steps on the same batches:
    n2n (net2net's coupling), n2n with the glow coupling and FrEIA, all at about the same parameters."""
    torch.manual_seed(seed)
    flow = ConditionalFlow.from_dict(SMALL)
    out: dict = {"n2n_parameters": parameters(flow)}
    glow = matched_glow(flow)
    out["glow_parameters"], out["glow_blocks"] = parameters(glow), glow.config.n_flows
    freia = matched_freia(flow)
    out["freia_parameters"], out["freia_blocks"] = parameters(freia), len(freia.inn.module_list)
    for name, model in (("n2n", flow), ("glow", glow), ("freia", freia)):
        model.train()
        generator = torch.Generator().manual_seed(seed)
        model(*data.batch(1024, generator))  # n2n's ActNorm init batch, as n2n-train draws one
        step = trainer_step(model, lr=LR)
        start = time.perf_counter()
        for _ in range(steps):
            step(*data.batch(batch_size, generator))
        out[f"{name}_s"] = time.perf_counter() - start
        out[f"{name}_bpd"] = heldout_bpd(model, data, rows=len(data.held_target))
    out["truth_bpd"] = data.truth["nll_nats_per_dim"] / math.log(2)
    return out


@click.command()
@click.option("--batch", "batches", multiple=True, type=int, default=(64, 1024), show_default=True)
@click.option("--repeat", default=3, show_default=True, help="Timed steps per model and batch size.")
@click.option("--steps", default=1000, show_default=True, help="Training steps of the NLL comparison.")
def main(batches: tuple[int, ...], repeat: int, steps: int) -> None:
    raw: dict = {}
    rows = []
    for batch_size in batches:
        times = raw[f"batch_{batch_size}"] = step_times(batch_size, repeat)
        ratio = min(times["n2n_s"]) / min(times["freia_s"])
        target = TARGETS.get(batch_size)
        rows.append(Row(f"step time at net2net size, batch {batch_size}: n2n / FrEIA "
                        f"({times['n2n_parameters'] / 1e6:.0f}M vs {times['freia_parameters'] / 1e6:.0f}M params, "
                        f"{times['freia_blocks']} AllInOneBlocks)",
                        f"{min(times['n2n_s']):.3f} s", f"{min(times['freia_s']):.3f} s", ratio,
                        f"<= {target:.1f}x" if target else "", ratio <= target if target else None))
    with tempfile.TemporaryDirectory(prefix="n2n-bench-") as tmp:
        view = write_synthetic(Path(tmp), "gaussian", n=20_000, src_dim=SMALL["cond_dim"], dst_dim=SMALL["dim"])
        nll = raw["nll"] = nll_after(load_pairs(view), steps, batch_size=64)
    for name, label in (("n2n", "n2n (net2net's coupling)"), ("glow", f"n2n --coupling glow ({nll['glow_blocks']} "
                                                                       "blocks)")):
        rows.append(Row(f"held-out NLL after {steps} steps, batch 64, synthetic Gaussian view "
                        f"(truth {nll['truth_bpd']:.3f} bits/dim): {label} vs FrEIA ({nll['freia_blocks']} blocks)",
                        f"{nll[f'{name}_bpd']:.3f} bits/dim", f"{nll['freia_bpd']:.3f} bits/dim", None,
                        "n2n <= FrEIA", nll[f"{name}_bpd"] <= nll["freia_bpd"]))
        rows.append(Row(f"the same: training time of the {steps} steps, {label} / FrEIA", f"{nll[f'{name}_s']:.1f} s",
                        f"{nll['freia_s']:.1f} s", nll[f"{name}_s"] / nll["freia_s"], "", None))
    report("freia_peer", {"net2net": NET2NET, "small": SMALL, "batches": list(batches), "repeat": repeat,
                          "steps": steps, "freia_block": "AllInOneBlock (defaults)"}, rows, raw)


if __name__ == "__main__":
    main()
