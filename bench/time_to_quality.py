"""Time to quality on the demo's image -> text view: the training seconds each translator kind takes until
the mean of 16 samples ranks the true caption as well as the MLP baseline does (median rank among the
distinct held-out captions, as n2n-eval reports it), and twice and four times that rank (where the MLP's
is not reached in the budget, these show the pace), both kinds at the demo's settings.

Each kind trains through ``n2n.train`` in chunks of steps, each call resuming the last (a resumed run is
the uninterrupted one, bit for bit), and is scored after every chunk; the seconds are the wall time of
the ``n2n.train`` calls (the view's loading included, alike for both). The MLP is n2n-eval's (2000
steps, seed 0). Needs the view that ``make demo`` pairs (``shards/ae_minilm``).
Run: python -m bench.time_to_quality [--view shards/ae_minilm] [--budget 240]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
import yaml

import n2n
from bench.common import Row, report
from n2n.evaluate.baseline import train_mlp
from n2n.evaluate.metrics import retrieval
from n2n.train.checkpoint import load_run
from n2n.train.data import PairedLatents, load_pairs, subsample

DEMO = Path(__file__).parents[1] / "configs" / "demo" / "ae_minilm.yaml"  # both kinds' settings: the demo's
SAMPLES = 16
FACTORS = (1, 2, 4)  # goals: the MLP's median rank times these


class Scorer:
    """The median rank of each pair's true target by the mean of ``SAMPLES`` samples, on ``rows`` held-out
    pairs (n2n-eval's seeded subsample), among the distinct held-out targets."""

    def __init__(self, data: PairedLatents, rows: int) -> None:
        distinct, first, truth = np.unique(data.held_rows[1], return_index=True, return_inverse=True)
        targets = data.held_target.latents[torch.from_numpy(data.held_rows[1][first])].float()
        self.rows = torch.from_numpy(subsample(len(truth), rows, 0))
        self.truth, self.candidates = truth[self.rows.numpy()], targets
        self.source = data.held_source[:][self.rows]

    def rank(self, predictions: torch.Tensor) -> float:
        return retrieval(predictions, self.truth, self.candidates)["median_rank"]

    @torch.no_grad()
    def run(self, run: Path) -> float:
        translator = load_run(run, checkpoint="last")  # the weights the race has reached
        draws = translator.flow.sample(self.source.repeat_interleave(SAMPLES, 0), 1.0, torch.Generator().manual_seed(0))
        return self.rank(translator.target_norm.inverse(draws).reshape(len(self.rows), SAMPLES, -1).mean(1))


def race(view: Path, out: Path, config: Path, kind: str, chunk: int, budget: float, goal: float,
         scorer: Scorer) -> list[dict]:
    """Train in chunks of ``chunk`` steps until the rank reaches ``goal`` or ``budget`` seconds of training
    pass; the curve: (steps, seconds, median rank) after each chunk."""
    seconds, curve = 0.0, []
    while seconds < budget and not (curve and curve[-1]["median_rank"] <= goal):
        steps = (len(curve) + 1) * chunk
        started = time.perf_counter()
        n2n.train(view, out, config=config, translator=kind, steps=steps, eval_every=chunk, eval_rows=64,
                  resume=bool(curve), compile=False, progress=False, logger="none")
        seconds += time.perf_counter() - started
        curve.append({"steps": steps, "seconds": seconds, "median_rank": scorer.run(out)})
    return curve


def reached(curve: list[dict], goal: float) -> float | None:
    """The training seconds at which ``curve`` first ranks at ``goal`` or better; None if it never does."""
    return next((point["seconds"] for point in curve if point["median_rank"] <= goal), None)


@click.command()
@click.option("--view", type=click.Path(path_type=Path), default=Path("shards/ae_minilm"), show_default=True,
              help="The demo's image -> text view (make demo pairs it).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DEMO,
              help="Both kinds' settings (n2n-train's --config). [default: configs/demo/ae_minilm.yaml]")
@click.option("--budget", default=240.0, show_default=True, help="Training seconds at most per kind.")
@click.option("--rows", default=500, show_default=True, help="Held-out pairs scored after each chunk.")
@click.option("--coupling-chunk", default=300, show_default=True, help="Coupling steps between scores (~20 s here).")
@click.option("--continuous-chunk", default=1000, show_default=True,
              help="Continuous steps between scores (~20 s here).")
def main(view: Path, config: Path, budget: float, rows: int, coupling_chunk: int, continuous_chunk: int) -> None:
    if not (view / "view.json").is_file():
        raise click.BadParameter(f"{view} is not a view: run make demo first (it pairs shards/ae_minilm)",
                                 param_hint="--view")
    settings = yaml.safe_load(config.read_text())
    data = load_pairs(view, settings.get("holdout", 0.05))
    chunks = {"coupling": coupling_chunk, "continuous": continuous_chunk}
    scorer = Scorer(data, rows)
    with torch.no_grad():
        goal = scorer.rank(data.target_norm.inverse(train_mlp(data, seed=0)(scorer.source)))
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, chunk in chunks.items():
            curves[kind] = race(view, Path(tmp) / kind, config, kind, chunk, budget, goal, scorer)
    rows_out = []
    for factor in FACTORS:  # the MLP's rank itself, and looser goals that show the pace where it is not reached
        target = factor * goal
        times = {kind: reached(curve, target) for kind, curve in curves.items()}

        def shown(kind: str, times: dict = times) -> str:
            if times[kind] is not None:
                return f"{times[kind]:.0f} s"
            return f"> {budget:.0f} s (best {min(p['median_rank'] for p in curves[kind]):.0f})"

        both = None not in times.values()
        rows_out.append(Row(f"training s to median rank <= {target:.0f} ({factor}x the MLP's; mean of {SAMPLES}, "
                            f"{len(scorer.rows)} held-out pairs): continuous vs coupling", shown("continuous"),
                            shown("coupling"), times["coupling"] / times["continuous"] if both else None,
                            "continuous first", times["continuous"] is not None and
                            (times["coupling"] is None or times["continuous"] <= times["coupling"])))
    report("time_to_quality", {"view": str(view), "budget": budget, "rows": len(scorer.rows), "goal": goal,
                               "config": settings, "chunks": chunks},
           rows_out, curves)


if __name__ == "__main__":
    main()
