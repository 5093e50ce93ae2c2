"""Pictures of a run: the loss curve that n2n-train redraws in the run folder at every checkpoint, and
the atomic PNG write that n2n-eval's eval.png shares.

matplotlib is imported inside the function, so importing n2n.train does not pay for it, and the
figure is drawn on an Agg canvas of its own rather than through pyplot: nothing global changes in a
process that plots elsewhere too (a notebook calling ``n2n.train``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

HEAD = 0.1  # the first tenth of the steps: the train curve there (the untrained flow) may leave the y range


def read_metrics(metrics: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, one per line, in order."""
    return [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]


def _points(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_loss(metrics: Path, out: Path, lines: dict[str, float]) -> Path:
    """Draw train and held-out NLL (bits/dim) against step from ``metrics`` (a run's metrics.jsonl:
    "step", "train_bpd" or a continuous translator's "train_loss", on an axis of its own, and, at
    evaluations, "heldout_bpd") into the PNG ``out``, with a dashed line
    for each ``lines`` entry (label: bits/dim, e.g. the linear-Gaussian floor, the analytic NLL).
    The y range follows the curves after their first tenth of steps, so the untrained flow's loss
    does not flatten the rest. Written atomically (a temp file beside ``out``, then ``os.replace``):
    a viewer sees the old plot or the new one. Returns ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics, out = Path(metrics), Path(out)
    records = read_metrics(metrics)
    train_steps, train = _points(records, "train_bpd")
    held_steps, held = _points(records, "heldout_bpd")
    fig = Figure(figsize=(7, 4.2), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.12, top=0.92)  # fixed: a layout engine draws twice
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(train_steps, train, color="C0", linewidth=1, label="train NLL")
    if held:
        ax.plot(held_steps, held, "o-", color="C1", markersize=3, linewidth=1.2, label="held-out NLL")
    for i, (label, value) in enumerate(lines.items()):
        ax.axhline(value, color=f"C{i + 2}", linestyle="--", linewidth=1, label=f"{label} ({value:.4f})")
    focus = list(held) + list(lines.values())
    if train_steps:
        after = train_steps[0] + HEAD * (train_steps[-1] - train_steps[0])
        focus += [v for s, v in zip(train_steps, train, strict=True) if s >= after]
    if focus:
        low, high = min(focus + train), max(focus)
        margin = 0.05 * (high - low) or 0.05 * max(abs(high), 1.0)
        ax.set_ylim(low - margin, high + margin)
    loss_steps, loss = _points(records, "train_loss")  # a continuous translator's: flow matching's, not an NLL
    if loss:
        fig.subplots_adjust(right=0.88)  # room for the right axis's ticks and label
        twin = ax.twinx()
        twin.plot(loss_steps, loss, color="C0", linewidth=1, alpha=0.6)
        twin.set_ylabel("train loss (flow matching)", color="C0")
        ax.plot([], [], color="C0", linewidth=1, alpha=0.6, label="train loss (right axis)")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (bits/dim)")
    ax.set_title(f"{metrics.absolute().parent.name}: negative log-likelihood")
    ax.grid(alpha=0.3)
    if train or held or lines or loss:
        ax.legend(loc="upper right", fontsize="small")
    return save_png(fig, out)


def save_png(fig, out: Path) -> Path:
    """Write the matplotlib Figure ``fig`` to ``out`` atomically: a temp file in the same folder, then
    ``os.replace``, so a viewer sees the old picture or the new one, never half of one."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
