"""torch.compile vs eager for the same cINN training step (the trainer's own loss and step).

Reports steps/s of both, the ratio, and what compiling cost (the first compiled call). On CPU
this decides n2n-train's default (--compile is on for CUDA only); on a GPU each batch size is
measured too. Run: python -m bench.compile [--device cuda --batch 16 --batch 64 --batch 256]
"""

from __future__ import annotations

import time
from functools import partial

import click
import torch

from bench.common import Row, report, timed, trainer_step
from n2n.cinn import ConditionalFlow

DEMO_FLOW = {"dim": 32, "cond_dim": 384, "n_flows": 8, "hidden_dim": 192, "embedding_dim": 256, "coupling": "affine"}
GPU_TARGET = {16: 2.0, 64: 2.0}


@click.command()
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--batch", "batches", multiple=True, type=int, default=(256,), show_default=True)
@click.option("--steps", default=50, show_default=True, help="Timed steps per way (after the warm-up).")
def main(device: str, batches: tuple[int, ...], steps: int) -> None:
    dev, rows, raw = torch.device(device), [], {}
    sync = dev.type == "cuda"
    for batch in batches:
        result = {}
        for way in ("eager", "compiled"):
            torch.manual_seed(0)
            flow = ConditionalFlow.from_dict(DEMO_FLOW).to(dev)
            x = torch.randn(batch, DEMO_FLOW["dim"], device=dev)
            c = torch.randn(batch, DEMO_FLOW["cond_dim"], device=dev)
            flow(x, c)  # ActNorm init, eagerly (as the trainer does)
            train = trainer_step(flow, compiled=way == "compiled")
            step = partial(train, x, c)
            start = time.perf_counter()
            step()  # compiles on the compiled way
            step()
            first = time.perf_counter() - start
            times = timed(lambda step=step: [step() for _ in range(steps)], 1, sync)
            result[way] = {"first_two_steps_s": first, "steps_per_s": steps / times[0]}
        raw[f"batch_{batch}"] = result
        ratio = result["compiled"]["steps_per_s"] / result["eager"]["steps_per_s"]
        target = GPU_TARGET.get(batch) if dev.type == "cuda" else None
        rows.append(Row(f"demo cINN step on {dev.type}, batch {batch}: compiled vs eager "
                        f"(compiling took {result['compiled']['first_two_steps_s']:.0f} s)",
                        f"{result['compiled']['steps_per_s']:.1f}/s", f"{result['eager']['steps_per_s']:.1f}/s",
                        ratio, f">= {target:.0f}x" if target else "", ratio >= target if target else None))
    report(f"compile-{dev.type}", {**DEMO_FLOW, "device": str(dev), "batches": list(batches), "steps": steps},
           rows, raw)


if __name__ == "__main__":
    main()
