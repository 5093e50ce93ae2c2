"""A run's facts and its eval.json as text: the one renderer of what n2n-eval prints and draws, what a saved
translator's model card and ``n2n serve`` show. It reads a checkpoint's header and a report and nothing
else (a report records its dataset's rows), so that the evaluation, the Hub format and the page each
import it and not one another, and a report downloaded without its dataset's plug-in reads whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from n2n.scoring import ScoreTable, upgrade_report

LABELS = {"translator": "translator", "linear": "linear LS", "mlp": "MLP", "procrustes": "Procrustes",
          "source": "source itself"}  # the last only where source and target share a space
POOL = 1024  # candidates of vec2vec's retrieval


@dataclass(frozen=True)
class Scores:
    """A report as a table: a header per column (the metric's, then one per translator), the rows, and a
    caption under them."""

    headers: list[str]
    rows: list[tuple[str, ...]]
    caption: str = ""

    def markdown(self) -> list[str]:
        """The table as Markdown lines; the rows with a number only."""
        return [f"| {' | '.join(self.headers)} |", "|---" * len(self.headers) + "|",
                *(f"| {' | '.join(row)} |" for row in self.rows if any(row[1:]))]


def run_summary(meta: dict, parameters: int) -> list[str]:
    """What a run is, as Markdown sentences: its experts, translator kind and size, step, and its held-out NLL
    beside the linear-Gaussian floor (``meta``: a checkpoint's header)."""
    source, target = ((meta[side].get("expert") or {}).get("spec", "?") for side in ("source", "target"))
    kind = meta["model"].get("translator", "coupling")
    lines = [f"`{source}` → `{target}`: a {kind} translator of {parameters:,} parameters, step {meta.get('step')}."]
    nll, floor = meta.get("heldout_bpd"), meta.get("linear_gaussian_bpd")
    if nll is not None:
        beside = f" (the linear-Gaussian floor: {floor:.3f})" if floor is not None else ""
        lines.append(f"Held-out NLL: {nll:.3f} bits/dim{beside}.")
    return lines


def columns(report: dict) -> list[str]:
    """The translators of a report's table: every one scored (the source itself only in a shared space)."""
    scores = upgrade_report(report).get("translation") or {}
    return [name for name in LABELS if name != "source" or name in scores]


def headers(report: dict) -> list[str]:
    """The table's headers: the metric, then each translator (``title`` names the run's kind)."""
    return ["metric", *(LABELS[name] for name in columns(report))]


def title(report: dict) -> str:
    """A report's title: the run, its step and, where the report records it, its translator's kind."""
    kind = f", a {report['kind']} translator" if report.get("kind") else ""
    return f"n2n-eval {report['run']} (step {report['step']}{kind})"


def score_rows(report: dict, dataset: ScoreTable | None = None) -> Scores:
    """Every row of a report (an eval.json of any version): the held-out NLL (the linear column holds the
    linear-Gaussian floor), the translation scores, and the dataset's rows, as the report recorded them or
    as ``dataset`` gives them (the run's translator and the MLP; the other columns empty)."""
    report = upgrade_report(report)
    if dataset is None:
        recorded = report.get("dataset_table") or {}
        dataset = ScoreTable([tuple(row) for row in recorded.get("rows", [])], recorded.get("caption", ""))
    floor, names = report.get("linear_gaussian_bpd"), columns(report)

    def row(metric: str, **cells: str) -> tuple[str, ...]:
        return (metric, *(cells.get(name, "") for name in names))

    nll = row("held-out NLL (bits/dim)", translator=f"{report['heldout_bpd']:.4f}",
              linear="" if floor is None else f"{floor:.4f}")
    rows = [nll, *translation_rows(report), *curve_rows(report), *(row(metric, translator=ours, mlp=mlp)
                                              for metric, ours, mlp in dataset.rows)]
    wide = (f"The MLP regresses, and the Fréchet distance and precision/recall are measured on, {report['subspace']} "
            "(standardised)." if report.get("subspace") else "")
    notes = [dataset.caption, wide]
    return Scores(headers(report), rows, " ".join(note for note in notes if note))


CURVE_LABELS = {"cosine": ("cosine to the truth", ".3f"), "top1": (f"retrieval top-1 among {POOL}", ".1%"),
                "judge": ("the dataset's judge", ".1%")}


def curve_rows(report: dict) -> list[tuple[str, ...]]:
    """The fidelity–diversity curve's best point per fidelity score (``evaluate.curve``): the translator's
    value with its temperature (and guidance), beside the baselines' single points."""
    curve = report.get("curve") or {}
    rows = []
    for metric, best in (curve.get("best") or {}).items():
        label, fmt = CURVE_LABELS.get(metric, (metric, ".3g"))
        knob = f"T {best['temperature']:g}" + (f", g {best['guidance']:g}" if best["guidance"] != 1 else "")
        cells = {"translator": f"{format(best['value'], fmt)} ({knob})"}
        for name, scores in (curve.get("baselines") or {}).items():
            if scores.get(metric) is not None:
                cells[name] = format(scores[metric], fmt)
        rows.append((f"{label}, best on the curve", *(cells.get(name, "") for name in columns(report))))
    return rows


def translation_rows(report: dict) -> list[tuple[str, ...]]:
    """The rows of a report's ``translation`` scores: (metric, one cell per translator of ``columns``)."""
    report = upgrade_report(report)
    scores = report.get("translation")
    if not scores:
        return []
    n = scores["samples"]

    def row(label: str, pick: Callable[[dict], float], fmt: str) -> tuple[str, ...]:
        def cell(name: str) -> str:
            try:
                return format(pick(scores[name]), fmt)
            except KeyError:  # a score this translator does not have (best of n: the run's), or an older report
                return ""
        return (label, *(cell(name) for name in columns(report)))

    return [
        row("retrieval top-1, one sample", lambda s: s["retrieval"]["top1"], ".1%"),
        row("retrieval top-5, one sample", lambda s: s["retrieval"]["top5"], ".1%"),
        row("median rank, one sample", lambda s: s["retrieval"]["median_rank"], ".0f"),
        row(f"median rank, mean of {n} samples", lambda s: s["retrieval_mean"]["median_rank"], ".0f"),
        row(f"retrieval top-1 among {POOL}, one sample", lambda s: s["retrieval_pool"]["top1"], ".1%"),
        row(f"mean rank among {POOL}, one sample", lambda s: s["retrieval_pool"]["mean_rank"], ".1f"),
        row(f"retrieval top-1, best of {n} (closest to the MLP)", lambda s: s["retrieval_best"]["top1"], ".1%"),
        row("cosine to the truth, one sample", lambda s: s["cosine"], ".3f"),
        row(f"cosine to the truth, mean of {n}", lambda s: s["cosine_mean"], ".3f"),
        row(f"cosine to the truth, best of {n}", lambda s: s["cosine_best"], ".3f"),
        row("cosine to an unrelated target, one sample", lambda s: s["cosine_unrelated"], ".3f"),
        row(f"cosine to an unrelated target, mean of {n}", lambda s: s["cosine_mean_unrelated"], ".3f"),
        row("Fréchet distance to the true targets", lambda s: s["frechet"], ".3g"),
        row("precision (k-NN, k=3)", lambda s: s["precision"], ".3f"),
        row("recall (k-NN, k=3)", lambda s: s["recall"], ".3f"),
    ]
