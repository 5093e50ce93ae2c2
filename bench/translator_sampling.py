"""Sampling speed of the two translator kinds at the demo's image -> text sizes (32-d source, 384-d target):
the coupling cINN of configs/demo/ae_minilm.yaml (8 blocks of width 256, embedding 128) against the
continuous translator at its defaults (3 residual blocks of width 512, 20 Heun steps, and 8 Euler steps),
random weights (timing needs no trained ones), samples/s at batch 1024 on the CPU. The ratio is the
coupling's samples/s over the continuous one's: how many times a continuous sample costs a coupling one.
Run: python -m bench.translator_sampling [--repeat 5]
"""

from __future__ import annotations

import click
import torch

from bench.common import Row, interleaved, report
from n2n.cinn import FlowConfig, build_flow

SOURCE, TARGET = 32, 384
COUPLING = FlowConfig(n_flows=8, hidden_dim=256, embedding_dim=128)  # configs/demo/ae_minilm.yaml's
CONTINUOUS = FlowConfig(translator="continuous", embedding_dim=128)


@click.command()
@click.option("--repeat", default=5, show_default=True, help="Timed calls of each, interleaved.")
@click.option("--batch", default=1024, show_default=True, help="Samples per call.")
def main(repeat: int, batch: int) -> None:
    torch.manual_seed(0)
    coupling, continuous = (build_flow(TARGET, SOURCE, config).eval() for config in (COUPLING, CONTINUOUS))
    c = torch.randn(batch, SOURCE)

    def sample(flow: torch.nn.Module, **options: object):
        @torch.no_grad()
        def run() -> torch.Tensor:
            return flow.sample(c, generator=torch.Generator().manual_seed(0), **options)
        return run

    ways = {"coupling": sample(coupling), "continuous, heun 20": sample(continuous),
            "continuous, euler 8": sample(continuous, steps=8, solver="euler")}
    times = interleaved(ways, repeat)
    best = {name: min(t) for name, t in times.items()}
    rows = [Row(f"samples/s at batch {batch}: coupling vs {name} (best of {repeat})",
                f"{batch / best['coupling']:.0f}/s", f"{batch / best[name]:.0f}/s", best[name] / best["coupling"],
                "the cost of a continuous sample in coupling samples")
            for name in ways if name != "coupling"]
    parameters = {name: sum(p.numel() for p in flow.parameters()) for name, flow in
                  (("coupling", coupling), ("continuous", continuous))}
    report("translator_sampling", {"repeat": repeat, "batch": batch, "source": SOURCE, "target": TARGET,
                                   "parameters": parameters}, rows, times)


if __name__ == "__main__":
    main()
