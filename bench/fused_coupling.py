"""Do the s and t nets of a half-coupling pay to run as one batched net? (They do: n2n's
cinn.flow.PairedMLP runs them so.)

Both nets of a half-coupling read the same input [half; h]. Stacked weights let one batched matmul
(torch.baddbmm over the pair) serve both at every layer: half the kernel launches, the same FLOPs,
the same function. The baseline is net2net's layout, four separate nn.Sequential nets per block,
built here from the same flow's weights; both compute the same z and log-determinant (checked),
and the trainer's step is timed for each.
Run: python -m bench.fused_coupling [--batch 64 --batch 256]
"""

from __future__ import annotations

from functools import partial

import click
import torch
from torch import Tensor, nn

from bench.common import NET2NET, Row, interleaved, report, trainer_step
from n2n.cinn import ConditionalFlow
from n2n.cinn.flow import DoubleAffineCoupling, PairedMLP, mlp


def separate_nets(paired: PairedMLP) -> tuple[nn.Sequential, nn.Sequential]:
    """The (s, t) nets of a PairedMLP as two net2net-style mlp()s with the same weights."""
    weights, biases = list(paired.weights), list(paired.biases)
    sizes = [w.shape[1] for w in weights] + [weights[-1].shape[2]]
    nets = []
    for i in range(2):
        net = mlp(sizes[0], sizes[1], len(weights) - 2, sizes[-1], tanh=i == 0)
        with torch.no_grad():
            for layer, weight, bias in zip([m for m in net if isinstance(m, nn.Linear)], weights, biases, strict=True):
                layer.weight.copy_(weight[i].T)
                layer.bias.copy_(bias[i, 0])
        nets.append(net)
    return nets[0], nets[1]


class SeparateCoupling(nn.Module):
    """DoubleAffineCoupling as net2net lays it out: four nets, each run on its own."""

    def __init__(self, coupling: DoubleAffineCoupling) -> None:
        super().__init__()
        self.split = coupling.split
        self.s1, self.t1 = separate_nets(coupling.net1)
        self.s2, self.t2 = separate_nets(coupling.net2)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x[:, : self.split], x[:, self.split :]
        u = torch.cat([a, h], dim=1)
        s = self.s1(u)
        b = b * s.exp() + self.t1(u)
        logdet = s.sum(1)
        u = torch.cat([b, h], dim=1)
        s = self.s2(u)
        a = a * s.exp() + self.t2(u)
        return torch.cat([a, b], dim=1), logdet + s.sum(1)


def separate_twin(flow: ConditionalFlow) -> ConditionalFlow:
    """A copy of `flow` whose couplings run their four nets separately, with the same weights."""
    twin = ConditionalFlow.from_dict(flow.to_dict())
    twin.load_state_dict(flow.state_dict())
    for block in twin.blocks:
        block.coupling = SeparateCoupling(block.coupling)
    return twin


@click.command()
@click.option("--batch", "batches", multiple=True, type=int, default=(64,), show_default=True)
@click.option("--repeat", default=3, show_default=True, help="Timed steps per model and batch size.")
def main(batches: tuple[int, ...], repeat: int) -> None:
    torch.manual_seed(0)
    flow = ConditionalFlow.from_dict(NET2NET).train()
    flow(torch.randn(256, NET2NET["dim"]), torch.randn(256, NET2NET["cond_dim"]))  # ActNorm init
    twin = separate_twin(flow).train()
    x, c = torch.randn(64, NET2NET["dim"]), torch.randn(64, NET2NET["cond_dim"])
    with torch.no_grad():
        (z, logdet), (z_twin, logdet_twin) = flow(x, c), twin(x, c)
    assert torch.allclose(z, z_twin, atol=1e-4) and torch.allclose(logdet, logdet_twin, rtol=1e-4, atol=1e-2)
    raw: dict = {}
    rows = []
    for batch_size in batches:
        x, c = torch.randn(batch_size, NET2NET["dim"]), torch.randn(batch_size, NET2NET["cond_dim"])
        steps = {"fused": partial(trainer_step(flow), x, c), "separate": partial(trainer_step(twin), x, c)}
        for name, times in interleaved(steps, repeat).items():
            raw[f"{name}_{batch_size}_s"] = times
        ours, base = min(raw[f"fused_{batch_size}_s"]), min(raw[f"separate_{batch_size}_s"])
        rows.append(Row(f"net2net-size step, batch {batch_size}: s,t nets fused (baddbmm) vs separate",
                        f"{ours:.3f} s", f"{base:.3f} s", base / ours, "(pays where > 1)"))
    report("fused_coupling", {**NET2NET, "batches": list(batches), "repeat": repeat}, rows, raw)


if __name__ == "__main__":
    main()
