"""The cINN against its peer: FrEIA's SequenceINN of AllInOneBlocks with the same target and
condition sizes, the same subnet (width, depth) and about as many parameters.

Blocks are matched on parameters, not on count: an AllInOneBlock is one half-coupling with one
net for both log-scale and shift, fed the raw condition; an n2n block is two half-couplings with
separate s and t nets fed a learnt embedding of the condition. Both train with the same step
(train.trainer.make_step), Adam settings, loss and batches.

- Step time at net2net size (dim 268, condition 768, hidden 1024, depth 2), batch 64 and 1024.
- Held-out NLL after the same number of steps and the same batches, and the training time to FrEIA's
  final NLL (time to quality: what a user waits for), on a synthetic view (a Gaussian law with a
  known NLL) at a size this CPU trains in about a minute, and on views of real latents (make demo's
  image -> text view, with the demo's flow at hidden width 128). Beside n2n at its defaults (glow
  coupling, Linear embedder): n2n with net2net's affine coupling, and net2net as it was (affine, MLP
  embedder), so that each default is measured.
Run: python -m bench.freia_peer [--steps 1000] [--view shards/ae_minilm]
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
from n2n.cinn import ConditionalFlow, nll
from n2n.cinn.flow import mlp
from n2n.shards.synthetic import write_synthetic
from n2n.train.data import PairedLatents, load_pairs
from n2n.train.heldout import heldout_bpd

SMALL = {"dim": 16, "cond_dim": 32, "n_flows": 4, "hidden_dim": 128}  # the NLL comparison's size
REAL_FLOW = {"n_flows": 8, "hidden_dim": 128, "embedding_dim": 128}  # the demo's image -> text flow, narrower
REAL_NOISE = 0.1  # the demo's --target-noise (MiniLM latents of template captions are point masses)
DEMO_VIEW = "shards/ae_minilm"  # make demo's image -> text view
CHECKS = 20  # held-out evaluations along each learning curve
CURVE_ROWS = 2000  # held-out pairs per evaluation along the curve
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

    def loss(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The trainer's objective, as n2n's coupling flow defines it: the mean NLL in nats."""
        return nll(*self(x, c)).mean()


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def blocks(model: nn.Module) -> int:
    """A FrEIA flow's AllInOneBlocks, or an n2n flow's blocks."""
    return len(model.inn.module_list) if isinstance(model, FreiaFlow) else model.config.n_flows


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
            "freia_blocks": blocks(freia), "n2n_s": times["n2n"], "freia_s": times["freia"]}


def matched_glow(flow: ConditionalFlow) -> ConditionalFlow:
    """n2n with the glow coupling (one net per half for s and t), its block count solved so that its
    parameter count is nearest ``flow``'s."""
    spec = {**flow.to_dict(), "coupling": "glow"}
    block = parameters(ConditionalFlow.from_dict({**spec, "n_flows": 2})) - parameters(
        ConditionalFlow.from_dict({**spec, "n_flows": 1}))
    base = parameters(ConditionalFlow.from_dict({**spec, "n_flows": 1})) - block
    return ConditionalFlow.from_dict({**spec, "n_flows": max(1, round((parameters(flow) - base) / block))})


def contenders(spec: dict) -> dict[str, nn.Module]:
    """The flows compared at about equal parameters: n2n at its defaults (glow coupling, Linear
    embedder), n2n with net2net's affine coupling, net2net as it was (affine, MLP embedder), FrEIA's."""
    torch.manual_seed(0)
    affine = ConditionalFlow.from_dict({**spec, "coupling": "affine"})
    return {"n2n": matched_glow(affine), "n2n affine": affine,
            "net2net": ConditionalFlow.from_dict({**spec, "coupling": "affine", "embedder": "mlp"}),
            "FrEIA": matched_freia(affine)}


def learning_curve(model: nn.Module, data: PairedLatents, steps: int, batch_size: int, noise: float,
                   checks: int = CHECKS, seed: int = 0) -> list[tuple[float, int, float]]:
    """(training seconds so far, step, held-out NLL in bits/dim) at ``checks`` evenly spaced steps; the
    evaluations' own time is not counted. Every model sees the same batches and noise."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    model(*data.batch(1024, generator, noise))  # n2n's ActNorm init batch, as n2n-train draws one
    step = trainer_step(model, lr=LR)
    curve, seconds, done = [], 0.0, 0
    for check in range(1, checks + 1):
        start = time.perf_counter()
        while done < steps * check // checks:
            step(*data.batch(batch_size, generator, noise))
            done += 1
        seconds += time.perf_counter() - start
        curve.append((seconds, done, heldout_bpd(model, data, rows=CURVE_ROWS)))
    return curve


def time_to(curve: list[tuple[float, int, float]], bpd: float) -> float | None:
    """Training seconds until the curve first reaches ``bpd`` (None if it never does)."""
    return next((seconds for seconds, _, value in curve if value <= bpd), None)


def compare(data: PairedLatents, spec: dict, steps: int, batch_size: int, noise: float) -> dict:
    """Every contender's learning curve, final held-out NLL and size on one view."""
    nats = data.truth.get("nll_nats_per_dim") if data.truth else None
    out: dict = {"truth_bpd": nats / math.log(2) if nats is not None else None}
    for name, model in contenders(spec).items():
        curve = learning_curve(model, data, steps, batch_size, noise)
        out[name] = {"parameters": parameters(model), "curve": curve, "seconds": curve[-1][0],
                     "bpd": heldout_bpd(model, data, rows=len(data.held_target)),
                     "blocks": blocks(model)}
    return out


def nll_rows(label: str, result: dict, steps: int) -> list[Row]:
    """Per n2n variant: held-out NLL after the same steps vs FrEIA's, and time to FrEIA's final NLL."""
    freia = result["FrEIA"]
    freia_final = freia["curve"][-1][2]  # on the curve's rows, as every model's time_to reads them
    truth = f", truth {result['truth_bpd']:.3f}" if result["truth_bpd"] else ""
    rows = []
    for name in ("n2n", "n2n affine", "net2net"):
        ours = result[name]
        rows.append(Row(f"{label}{truth}: held-out NLL after {steps} steps, {name} ({ours['blocks']} blocks, "
                        f"{ours['parameters'] / 1e3:.0f}k params) vs FrEIA ({freia['blocks']} blocks, "
                        f"{freia['parameters'] / 1e3:.0f}k)", f"{ours['bpd']:.3f} bits/dim",
                        f"{freia['bpd']:.3f} bits/dim", None, "n2n <= FrEIA", ours["bpd"] <= freia["bpd"]))
        reached = time_to(ours["curve"], freia_final)
        rows.append(Row(f"{label}: training time to FrEIA's final held-out NLL ({freia_final:.3f} on "
                        f"{CURVE_ROWS} pairs), {name} / FrEIA",
                        f"{reached:.1f} s" if reached is not None else "not reached", f"{freia['seconds']:.1f} s",
                        reached / freia["seconds"] if reached is not None else None, "<= 0.8x",
                        reached is not None and reached <= 0.8 * freia["seconds"]))
    return rows


@click.command()
@click.option("--batch", "batches", multiple=True, type=int, default=(64, 1024), show_default=True)
@click.option("--repeat", default=3, show_default=True, help="Timed steps per model and batch size.")
@click.option("--steps", default=1000, show_default=True, help="Training steps of the NLL comparisons.")
@click.option("--view", "views", multiple=True, type=click.Path(exists=True, file_okay=False),
              help=f"Views of real latents to compare on as well, with a demo-size flow and the demo's target "
                   f"noise.  [default: {DEMO_VIEW} where make demo has made it]")
def main(batches: tuple[int, ...], repeat: int, steps: int, views: tuple[str, ...]) -> None:
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
    views = views or ((DEMO_VIEW,) if Path(DEMO_VIEW).is_dir() else ())
    with tempfile.TemporaryDirectory(prefix="n2n-bench-") as tmp:
        view = write_synthetic(Path(tmp), "gaussian", n=20_000, src_dim=SMALL["cond_dim"], dst_dim=SMALL["dim"])
        raw["gaussian"] = compare(load_pairs(view), SMALL, steps, batch_size=64, noise=0.0)
    rows += nll_rows("synthetic Gaussian view, batch 64", raw["gaussian"], steps)
    for path in views:
        data = load_pairs(path)
        spec = {"dim": data.held_target.shape[1], "cond_dim": data.held_source.shape[1], **REAL_FLOW}
        raw[path] = compare(data, spec, steps, batch_size=256, noise=REAL_NOISE)
        rows += nll_rows(f"{path} (real latents), batch 256", raw[path], steps)
    report("freia_peer", {"net2net": NET2NET, "small": SMALL, "real_flow": REAL_FLOW, "real_noise": REAL_NOISE,
                          "batches": list(batches), "repeat": repeat, "steps": steps, "views": list(views),
                          "freia_block": "AllInOneBlock (defaults)"}, rows, raw)


if __name__ == "__main__":
    main()
