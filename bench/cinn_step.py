"""The cINN training step against the machine's limit: FLOPs per step / step time, as a fraction of
the float32 GEMM throughput that torch.mm reaches on this machine in the same run.

FLOPs are counted from the layer shapes: every Linear (and each net of a PairedMLP) costs 2*B*in*out
forward and twice that backward (input and weight gradients; the embedder's first layer needs no
input gradient).
Element-wise work (activations, ActNorm, the affine update) is not counted: it is the part of
the step that cannot run at GEMM speed, which is what the fraction shows.
Run: python -m bench.cinn_step [--batch 256 --batch 1024]
"""

from __future__ import annotations

from functools import partial

import click
import torch
from torch import nn

from bench.common import NET2NET, Row, interleaved, report, timed, trainer_step
from n2n.cinn import ConditionalFlow
from n2n.cinn.flow import PairedMLP

TARGETS = {256: 0.70, 1024: 0.85}


def step_flops(flow: ConditionalFlow, batch: int) -> int:
    """Multiply-adds x 2 of one forward + backward pass, from the layer shapes (the embedder's
    Linears, the glow couplings' Linears and the affine couplings' stacked [2, in, out] weights)."""
    first = next(layer for layer in flow.embedder.modules() if isinstance(layer, nn.Linear))
    linear = sum((4 if layer is first else 6) * batch * layer.in_features * layer.out_features
                 for layer in flow.modules() if isinstance(layer, nn.Linear))
    return linear + sum(6 * batch * weight.numel()
                        for net in flow.modules() if isinstance(net, PairedMLP) for weight in net.weights)


def gemm_flops_per_s(size: int = 4096, repeat: int = 5) -> tuple[float, list[float]]:
    """Best float32 torch.mm throughput at size x size (one warm-up call first)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = timed(lambda: torch.mm(a, b), repeat)
    return 2 * size**3 / min(times), times


@click.command()
@click.option("--batch", "batches", multiple=True, type=int, default=(256, 1024), show_default=True)
@click.option("--repeat", default=3, show_default=True, help="Timed steps per batch size (after one warm-up).")
def main(batches: tuple[int, ...], repeat: int) -> None:
    torch.manual_seed(0)
    peak, gemm_times = gemm_flops_per_s()
    raw: dict = {"gemm_flops_per_s": peak, "gemm_s": gemm_times}
    rows = []
    flow = ConditionalFlow.from_dict(NET2NET)
    flow.train()
    flow(torch.randn(256, flow.dim), torch.randn(256, NET2NET["cond_dim"]))  # ActNorm init
    for batch in batches:
        x, c = torch.randn(batch, flow.dim), torch.randn(batch, NET2NET["cond_dim"])
        train = trainer_step(flow)
        times = interleaved({"step": partial(train, x, c)}, repeat)["step"]
        flops = step_flops(flow, batch)
        fraction = flops / min(times) / peak
        raw[f"batch_{batch}"] = {"step_s": times, "flops": flops}
        target = TARGETS.get(batch)
        rows.append(Row(f"cINN step at net2net size, batch {batch}: FLOP/s vs torch.mm",
                        f"{flops / min(times) / 1e9:.0f} GFLOP/s", f"{peak / 1e9:.0f} GFLOP/s", fraction,
                        f">= {target:.2f}x" if target else "", fraction >= target if target else None))
    report("cinn_step", {**NET2NET, "batches": list(batches), "repeat": repeat,
                         "parameters": sum(p.numel() for p in flow.parameters())}, rows, raw)


if __name__ == "__main__":
    main()
