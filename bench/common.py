"""What every benchmark shares: the machine's description, timing, and the result table + JSON.

A benchmark measures n2n's real code path against a baseline in the same run, and reports the
ratio: absolute times on a shared 2-core machine are noise, ratios measured back to back are not.
Results go to bench/results/<name>.json (written atomically) and to a table on the terminal.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from n2n.cinn import ConditionalFlow
from n2n.shards import write_json_atomic
from n2n.train.trainer import Objective, make_loss, make_optimizer, make_step

RESULTS = Path(__file__).parent / "results"  # N2N_BENCH_RESULTS overrides it (the tests write elsewhere)
# net2net's BERT -> BigGAN cINN, as net2net built it (separate s and t nets, an MLP condition embedder)
NET2NET = {"dim": 268, "cond_dim": 768, "n_flows": 24, "hidden_dim": 1024, "coupling": "affine", "embedder": "mlp"}


def machine() -> dict:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = names[0] if names else platform.processor()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def trainer_step(flow: ConditionalFlow | torch.nn.Module, compiled: bool = False, lr: float = 1e-4) -> Callable:
    """n2n-train's own step(x, c) for ``flow`` (either kind, or any module with their ``loss``): its loss
    (compiled or not), backward, fused Adam."""
    return make_step(make_loss(Objective(flow), compiled, Console(stderr=True)), make_optimizer(flow, lr))


def timed(fn: Callable[[], object], repeat: int = 3, sync: bool = False) -> list[float]:
    """Wall seconds of ``repeat`` calls of ``fn`` (CUDA synchronised around each where ``sync``)."""
    times = []
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def interleaved(steps: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Seconds of ``repeat`` calls of each competitor, after two warm-up calls each (the first steps
    run slow: optimiser state, allocator), alternating so that a slow moment of the machine hits all."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            times[name] += timed(step, 1)
    return times


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Row:
    """One compared figure; ``ratio`` reads as its target states it (a speed-up, or an overhead)."""

    metric: str
    ours: str
    baseline: str
    ratio: float | None
    target: str = ""
    met: bool | None = None


def report(name: str, settings: dict, rows: list[Row], raw: dict, console: Console | None = None) -> Path:
    """Print the table and write bench/results/<name>.json; returns the JSON path."""
    table = Table(title=f"bench {name}")
    for column in ("metric", "n2n", "baseline", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for r in rows:
        met = "" if r.met is None else ("[green]yes" if r.met else "[red]no")
        table.add_row(r.metric, r.ours, r.baseline, "" if r.ratio is None else f"{r.ratio:.2f}x", r.target, met)
    (console or Console()).print(table)
    folder = Path(os.environ.get("N2N_BENCH_RESULTS", RESULTS))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    write_json_atomic(path, {"name": name, "machine": machine(), "settings": settings, "raw": raw,
                             "rows": [r.__dict__ for r in rows]})
    return path


def parse_device(ctx: click.Context, param: click.Parameter, value: str) -> torch.device:
    """``--device cpu|cuda|cuda:N`` as a torch.device: a GPU that this torch does not see is a usage
    error at once, not a crash after minutes of building models. ``cuda:N`` becomes the current GPU,
    so that ``torch.cuda.synchronize()`` (``timed(..., sync=True)``) waits on the one measured."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r}: give cpu, cuda or cuda:N")
    dev = torch.device(value)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise click.BadParameter(f"{value}: this torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


DEVICE_OPTION = click.option("--device", default="cpu", show_default=True, callback=parse_device,
                             help="Where the models and the baseline run: cpu, cuda or cuda:N.")
