"""An eval.json as the rows of its table: one renderer for what n2n-eval prints and draws, what a
saved translator's model card and ``n2n serve`` show. It reads a report and nothing else, so that the
evaluation, the Hub format and the page each import it and not one another.
"""

from __future__ import annotations

from collections.abc import Callable

from n2n.scoring import ScoreTable

TRANSLATORS = {"cinn": "cINN", "linear": "linear LS", "mlp": "MLP", "procrustes": "Procrustes",
               "source": "source itself"}  # the last only where source and target share a space


def columns(report: dict) -> list[str]:
    """The translators of a report's table: every one scored (the source itself only in a shared space)."""
    scores = report.get("translation") or {}
    return [name for name in TRANSLATORS if name != "source" or name in scores]


POOL = 1024  # candidates of vec2vec's retrieval


def translation_rows(report: dict) -> list[tuple[str, ...]]:
    """The printed rows of ``translation_scores``: (metric, one cell per translator of ``columns``)."""
    scores = report.get("translation")
    if not scores:
        return []
    n = scores["samples"]

    def row(label: str, pick: Callable[[dict], float], fmt: str) -> tuple[str, ...]:
        def cell(name: str) -> str:
            try:
                return format(pick(scores[name]), fmt)
            except KeyError:  # a score this translator does not have (best of n: the cINN's), or an older report
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


def report_rows(report: dict, scores: ScoreTable) -> list[tuple[str, ...]]:
    """Every row of the report's table: (metric, one cell per translator of ``columns``); the linear column of
    the NLL row is the linear-Gaussian floor, and the dataset's rows (``scores``: cINN, MLP) leave the others
    empty."""
    floor = report.get("linear_gaussian_bpd")
    names = columns(report)

    def row(metric: str, **cells: str) -> tuple[str, ...]:
        return (metric, *(cells.get(name, "") for name in names))

    nll = row("held-out NLL (bits/dim)", cinn=f"{report['heldout_bpd']:.4f}",
              linear="" if floor is None else f"{floor:.4f}")
    return [nll, *translation_rows(report), *(row(metric, cinn=cinn, mlp=mlp) for metric, cinn, mlp in scores.rows)]
