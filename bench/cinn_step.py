"""The cINN training step against the machine's limit: FLOPs per step / step time, as a fraction of
the GEMM throughput that torch.mm reaches on the same device at the same dtype in the same run.

FLOPs are counted from the layer shapes: every Linear (and each net of a PairedMLP) costs 2*B*in*out
forward and twice that backward (input and weight gradients; the embedder's first layer needs no
input gradient).
Element-wise work (activations, ActNorm, the affine update) is not counted: it is the part of
the step that cannot run at GEMM speed, which is what the fraction shows.

``--dtype bfloat16``: n2n-train has no reduced-precision step, so this one is n2n-train's step with
the flow's forward under ``torch.autocast`` at bfloat16 (backward outside it, as torch's recipe has
it; bfloat16 needs no loss scaling), against torch.mm in bfloat16: what such a path would reach.
Run: python -m bench.cinn_step [--device cuda --dtype bfloat16 --batch 256 --batch 1024]
"""

from __future__ import annotations

from functools import partial

import click
import torch
from torch import nn

from bench.common import DEVICE_OPTION, NET2NET, Row, report, timed, trainer_step
from n2n.cinn import ConditionalFlow, nll
from n2n.cinn.flow import PairedMLP

TARGETS = {256: 0.70, 1024: 0.85}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Autocast(nn.Module):
    """The flow's forward under autocast at ``dtype``, its outputs in float32 so that the trainer's loss
    (the NLL's sums) is taken at full precision; the parameters stay the flow's own, in float32."""

    def __init__(self, flow: ConditionalFlow, dtype: torch.dtype) -> None:
        super().__init__()
        self.flow, self.dtype = flow, dtype

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=self.dtype):
            z, logdet = self.flow(x, c)
        return z.float(), logdet.float()

    def loss(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return nll(*self(x, c)).mean()


def step_flops(flow: ConditionalFlow, batch: int) -> int:
    """Multiply-adds x 2 of one forward + backward pass, from the layer shapes (the embedder's
    Linears, the glow couplings' Linears and the affine couplings' stacked [2, in, out] weights)."""
    first = next(layer for layer in flow.embedder.modules() if isinstance(layer, nn.Linear))
    linear = sum((4 if layer is first else 6) * batch * layer.in_features * layer.out_features
                 for layer in flow.modules() if isinstance(layer, nn.Linear))
    return linear + sum(6 * batch * weight.numel()
                        for net in flow.modules() if isinstance(net, PairedMLP) for weight in net.weights)


def gemm_flops_per_s(dev: torch.device, dtype: torch.dtype, size: int = 4096,
                     repeat: int = 5) -> tuple[float, list[float]]:
    """Best torch.mm throughput at size x size on ``dev`` in ``dtype`` (one warm-up call first)."""
    a, b = (torch.randn(size, size, device=dev, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    times = timed(lambda: torch.mm(a, b), repeat, sync=dev.type == "cuda")
    return 2 * size**3 / min(times), times


@click.command()
@DEVICE_OPTION
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
              help="The step's precision (bfloat16: its forward under autocast) and torch.mm's.")
@click.option("--batch", "batches", multiple=True, type=int, default=(256, 1024), show_default=True)
@click.option("--repeat", default=3, show_default=True, help="Timed steps per batch size (after two warm-ups).")
@click.option("--gemm-size", default=4096, show_default=True, help="torch.mm's square size (the baseline).")
@click.option("--n-flows", default=NET2NET["n_flows"], show_default=True,
              help="Coupling blocks (net2net's); fewer make a smoke run, e.g. of bfloat16 on a CPU without it.")
def main(device: torch.device, dtype: str, batches: tuple[int, ...], repeat: int, gemm_size: int,
         n_flows: int) -> None:
    torch.manual_seed(0)
    sync = device.type == "cuda"
    peak, gemm_times = gemm_flops_per_s(device, DTYPES[dtype], gemm_size)
    raw: dict = {"gemm_flops_per_s": peak, "gemm_s": gemm_times}
    rows = []
    spec = {**NET2NET, "n_flows": n_flows}
    flow = ConditionalFlow.from_dict(spec).to(device)
    flow.train()
    flow(torch.randn(256, flow.dim, device=device), torch.randn(256, NET2NET["cond_dim"], device=device))  # ActNorm
    model = flow if dtype == "float32" else Autocast(flow, DTYPES[dtype])
    size = "net2net size" if n_flows == NET2NET["n_flows"] else f"net2net width, {n_flows} blocks"
    shown = f"{size} on {device.type}" + ("" if dtype == "float32" else ", forward under bfloat16 autocast")
    for batch in batches:
        x, c = torch.randn(batch, flow.dim, device=device), torch.randn(batch, NET2NET["cond_dim"], device=device)
        step = partial(trainer_step(model), x, c)
        step()  # two warm-ups: the first steps run slow (optimiser state, allocator)
        step()
        times = timed(step, repeat, sync)
        flops = step_flops(flow, batch)
        fraction = flops / min(times) / peak
        raw[f"batch_{batch}"] = {"step_s": times, "flops": flops}
        target = TARGETS.get(batch)
        rows.append(Row(f"cINN step at {shown}, batch {batch}: FLOP/s vs torch.mm in {dtype}",
                        f"{flops / min(times) / 1e9:.0f} GFLOP/s", f"{peak / 1e9:.0f} GFLOP/s", fraction,
                        f">= {target:.2f}x" if target else "", fraction >= target if target else None))
    name = "cinn_step" if (device.type, dtype) == ("cpu", "float32") else f"cinn_step-{device.type}-{dtype}"
    report(name, {**spec, "device": str(device), "dtype": dtype, "autocast": dtype != "float32",
                  "batches": list(batches), "repeat": repeat, "gemm_size": gemm_size,
                  "parameters": sum(p.numel() for p in flow.parameters())}, rows, raw)


if __name__ == "__main__":
    main()
