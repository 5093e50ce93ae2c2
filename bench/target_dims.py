"""Targets of any width: what a translator's step, its memory and n2n-eval's law and Fréchet distance cost as the
target grows from 256 to 65,536 dims (an SDXL VAE's latent at 1024 px), source 384 (MiniLM).

Per width, a synthetic Gaussian view (``n2n-shards synth``: 2 x ``--rows`` pairs, half held out, as n2n-eval
scores 2,000 held-out rows). Each measurement runs in a fresh process, so that its peak memory is its own:
- per kind, n2n-train's own step (``bench.common.trainer_step``: the loss, backward, Adam) on a translator of one
  fixed size at every width (coupling: 8 blocks of 128; continuous: velocity width 128), started at the view's
  law as n2n-train starts it, and the process's peak resident memory;
- the low-rank law and, up to FULL_LAW_MAX dims, the full one beside it (``train.heldout.fit_floor``; n2n-eval
  fits the full up to 4096 dims, the low-rank above): fit time and held-out bits/dim, where the full
  covariance stops being cheap;
- the Fréchet distance of the law's predictions to the held-out targets (from the rows where d >= rows).

The ratios: a coupling step at each width over one at 4096 (target <= 20x at 65,536: 16x is linear), and the
low-rank law's fit time over the full law's. Where a step's activations reach 32 MiB (``train.heap``: 65,536
dims at batch 256), also the coupling step with its large tensors mapped afresh each time, as glibc does by
default, against n2n-train's, served from the heap.
Run: python -m bench.target_dims [--dims 256,1024,4096,8192,16384,65536] [--rows 2000]
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import tempfile
import time
from pathlib import Path

import click
import torch

from bench.common import Row, peak_rss_mib, report, timed, trainer_step
from n2n.cinn import FlowConfig, build_flow
from n2n.cinn.lowrank_gaussian import FULL_WIDTH
from n2n.evaluate.metrics import frechet_distance
from n2n.shards.synthetic import write_synthetic
from n2n.train.data import load_pairs
from n2n.train.heap import MMAP_CEILING, activation_bytes, heap_for
from n2n.train.heldout import fit_floor, floor_bpd

SOURCE = 384
KINDS = {"coupling": FlowConfig(n_flows=8, hidden_dim=128), "continuous": FlowConfig(translator="continuous",
                                                                                         velocity_width=128)}
FULL_LAW_MAX = 8192  # the widest full law fitted beside the low-rank one (its d x d: 512 MiB in float64)
BATCH = 256


def step_cost(view: Path, kind: str, repeat: int, heap: bool = True) -> dict:
    """Seconds per n2n-train step of ``kind`` on the view and this process's peak memory (a fresh process); its
    large tensors from the heap as n2n-train serves them, or (``heap=False``) as glibc would."""
    data = load_pairs(view, 0.5)
    torch.manual_seed(0)
    flow = build_flow(data.target.shape[1], SOURCE, KINDS[kind])
    flow.start_from(fit_floor(data))
    step = trainer_step(flow)
    generator = torch.Generator().manual_seed(0)

    def one() -> None:
        x, c = data.batch(BATCH, generator)
        step(x, c, *flow.draw(BATCH, generator))

    largest = activation_bytes(BATCH, data.target.shape[1])
    with heap_for(torch.device("cpu"), largest) if heap else contextlib.nullcontext():
        one()  # warm-up: the optimiser's state, the allocator
        seconds = timed(one, repeat)
    return {"step_s": min(seconds), "peak_mib": peak_rss_mib(),
            "parameters": sum(p.numel() for p in flow.parameters())}


def law_cost(view: Path) -> dict:
    """n2n-eval's law (fit time, held-out bits/dim), the full law beside it where it fits, and the Fréchet
    distance of the law's predictions to the held-out targets (a fresh process)."""
    data = load_pairs(view, 0.5)
    rows, dim = len(data.held_target), data.target.shape[1]
    found = {}
    for law in ("lowrank", "full") if dim <= FULL_LAW_MAX else ("lowrank",):
        start = time.perf_counter()
        fitted = fit_floor(data, law=law)
        found[f"{law}_fit_s"] = time.perf_counter() - start
        found[f"{law}_bpd"] = floor_bpd(fitted, data, rows)
        if law == ("full" if dim <= FULL_WIDTH else "lowrank"):  # the one n2n-eval fits (--law auto)
            predictions = data.target_norm.inverse(fitted.mean(data.held_source[:]).float())
            truth = data.target_norm.inverse(data.held_target[:])
            found["frechet_s"] = min(timed(functools.partial(frechet_distance, predictions, truth), 1))
    found["peak_mib"] = peak_rss_mib()
    return found


def in_fresh_process(fn, *args) -> dict:  # noqa: ANN001
    """``fn(*args)`` in a spawned process: its own peak memory, and nothing it allocated stays here."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


@click.command()
@click.option("--dims", default="256,1024,4096,8192,16384,65536", show_default=True,
              help="Target widths, comma-separated.")
@click.option("--rows", default=2000, show_default=True, help="Train pairs (as many held out) per view.")
@click.option("--repeat", default=3, show_default=True, help="Timed steps per kind and width (the best counts).")
def main(dims: str, rows: int, repeat: int) -> None:
    widths = [int(d) for d in dims.split(",")]
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="n2n-target-dims-") as tmp:
        for dim in widths:
            view = write_synthetic(Path(tmp) / str(dim), "gaussian", n=2 * rows, src_dim=SOURCE, dst_dim=dim)
            results[dim] = {"law": in_fresh_process(law_cost, view),
                            **{kind: in_fresh_process(step_cost, view, kind, repeat) for kind in KINDS}}
            if activation_bytes(BATCH, dim) >= MMAP_CEILING:
                results[dim]["mapped"] = in_fresh_process(step_cost, view, "coupling", repeat, False)
            click.echo(f"{dim} dims: {results[dim]}", err=True)
    base = 4096 if 4096 in results else widths[0]
    table = []
    for dim, found in results.items():
        for kind in KINDS:
            ratio = found[kind]["step_s"] / results[base][kind]["step_s"]
            target = "<= 20x at 65,536 (16x is linear)" if kind == "coupling" and dim == 65536 else ""
            table.append(Row(f"{kind} step at {dim:,} dims vs {base:,} (peak {found[kind]['peak_mib']:,.0f} MiB, "
                             f"{found[kind]['parameters']:,} parameters)", f"{found[kind]['step_s']:.3f} s",
                             f"{results[base][kind]['step_s']:.3f} s", ratio, target,
                             ratio <= 20 if target else None))
        if "mapped" in found:
            heap, mapped = found["coupling"], found["mapped"]
            table.append(Row(f"coupling step at {dim:,} dims, large tensors from the heap vs mapped afresh (peak "
                             f"{heap['peak_mib']:,.0f} vs {mapped['peak_mib']:,.0f} MiB)", f"{heap['step_s']:.3f} s",
                             f"{mapped['step_s']:.3f} s", heap["step_s"] / mapped["step_s"]))
        law = found["law"]
        full = (f"{law['full_fit_s']:.1f} s, {law['full_bpd']:.4f} bits/dim" if "full_fit_s" in law
                else "not fitted: d x d")
        table.append(Row(f"the low-rank law at {dim:,} dims vs the full one (n2n-eval fits the "
                         f"{'full' if dim <= FULL_WIDTH else 'low-rank'}); Fréchet distance {law['frechet_s']:.2f} s; "
                         f"peak {law['peak_mib']:,.0f} MiB", f"{law['lowrank_fit_s']:.1f} s, "
                         f"{law['lowrank_bpd']:.4f} bits/dim", full,
                         law["lowrank_fit_s"] / law["full_fit_s"] if "full_fit_s" in law else None))
    report("target_dims", {"dims": widths, "rows": rows, "source": SOURCE, "repeat": repeat, "batch": BATCH,
                           "configs": {kind: str(config) for kind, config in KINDS.items()}}, table,
           {str(dim): found for dim, found in results.items()})


if __name__ == "__main__":
    main()
