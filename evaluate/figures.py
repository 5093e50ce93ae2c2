"""eval.png: a run's scores as a picture, where a person would rather look than read.

Top: the table n2n-eval prints (the run's translator beside the linear map and the MLP). Below it, where the
target expert decodes: for a few held-out pairs, the true target's decoding, then the linear map's
and the MLP's predictions, then the translator's samples, one row per pair: whether samples vary where the
source leaves things open, and stay on the data where the baselines blur, shows at a glance. Where
the target expert reads text, the captions nearest to those predictions instead (``evaluate.texts``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

from n2n.scoring import HeldOut
from n2n.train.plots import save_png
from n2n.translate.report import Scores

COLUMNS = ("truth", "linear LS", "MLP")
EDIT_COLUMNS = ("original", "edit", "resampling", "MLP arithmetic")


def gallery(held: HeldOut, pairs: int = 4, samples: int = 6) -> torch.Tensor:
    """Images [pairs, 3 + samples, 3, H, W] in [0, 1]: per held-out pair (distinct targets, spread over the
    held-out set) its true target, the linear and MLP predictions, and ``samples`` of the translator's samples,
    decoded."""
    expert = held.target_expert()
    _, first = np.unique(held.target_row, return_index=True)
    chosen = torch.from_numpy(np.sort(first)[np.linspace(0, len(first) - 1, min(pairs, len(first))).astype(int)])
    source = held.source[chosen]
    latents = torch.cat([held.target[chosen].float().unsqueeze(1),
                         held.predictors["linear"](source, 1).unsqueeze(1),
                         held.predictors["mlp"](source, 1).unsqueeze(1),
                         held.predictors["translator"](source, samples).reshape(len(chosen), samples, -1)], dim=1)
    images = expert.decode(latents.flatten(0, 1).float()).float().cpu()
    return images.reshape(len(chosen), latents.shape[1], *images.shape[1:])


def edit_gallery(held: HeldOut, examples: list[dict]) -> tuple[torch.Tensor, list[str]]:
    """Images [len(examples), 4, 3, H, W] in [0, 1] and a label per row: for each example a dataset's scorer
    recorded (``{"row": held-out row, "item": the new source as an item, "label"}``), the original target, its
    edit through the residual, a fresh sample under the new source and the MLP's latent arithmetic."""
    rows = torch.tensor([example["row"] for example in examples])
    x, c, new = held.target[rows].float(), held.source[rows], held.encode_source([e["item"] for e in examples])
    mlp = held.predictors["mlp"]
    latents = torch.stack([x, held.edit(x, c, new), held.predictors["translator"](new, 1),
                           x + mlp(new, 1) - mlp(c, 1)], dim=1)
    images = held.target_expert().decode(latents.flatten(0, 1)).float().cpu()
    return images.reshape(len(examples), len(EDIT_COLUMNS), *images.shape[1:]), [e["label"] for e in examples]


CURVE_AXES = (("recall", "cosine", "k-NN recall (diversity)", "cosine to the truth (fidelity)"),
              ("open_entropy", "judge", "entropy of open attributes (diversity)", "the dataset's judge (fidelity)"))
BASELINE_MARKS = {"mlp": ("MLP", "s", "tab:red"), "linear": ("linear LS", "D", "tab:gray")}


def draw_curve(axes: list, curve: dict) -> None:
    """The fidelity–diversity curve (``evaluate.curve``) on two axes: cosine against recall, and the dataset's
    judge against its open entropy (recall where it knows no open attributes); a line per guidance, each point
    labelled with its temperature, the baselines as single marks."""
    for axis, (x_key, y_key, x_label, y_label) in zip(axes, CURVE_AXES, strict=True):
        points = curve["points"]
        if y_key == "judge" and not any(p.get("judge") is not None for p in points):
            axis.axis("off")
            continue
        if not any(p.get(x_key) is not None for p in points):
            x_key, x_label = "recall", "k-NN recall (diversity)"
        for guidance in dict.fromkeys(p["guidance"] for p in points):
            line = [p for p in points if p["guidance"] == guidance]
            xs, ys = [p[x_key] for p in line], [p[y_key] for p in line]
            axis.plot(xs, ys, "o-", ms=4, label="translator" + (f", guidance {guidance:g}" if guidance != 1 else ""))
            for p, x, y in zip(line, xs, ys, strict=True):
                axis.annotate(f"T {p['temperature']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for name, scores in curve.get("baselines", {}).items():
            if scores.get(y_key) is not None:
                label, marker, color = BASELINE_MARKS.get(name, (name, "x", "black"))
                axis.plot([scores.get(x_key) or 0.0], [scores[y_key]], marker, color=color, label=label)
        axis.set_xlabel(x_label, fontsize=7)
        axis.set_ylabel(y_label, fontsize=7)
        axis.tick_params(labelsize=6)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)


def eval_figure(title: str, scores: Scores, images: torch.Tensor | None, note: str | None, out: Path,
                lines: list[str] | None = None, edits: tuple[torch.Tensor, list[str]] | None = None,
                curve: dict | None = None) -> Path:
    """Draw the table (``scores``: ``translate.report.score_rows``), the fidelity–diversity ``curve`` and, if
    given, the ``gallery`` images or ``lines`` of text (the captions nearest to a text target's predictions),
    and the ``edit_gallery``; write ``out`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

    grid = None if images is None else make_grid(images.flatten(0, 1), nrow=images.shape[1], padding=2, pad_value=1)
    rows = scores.rows
    table_height = 0.22 * (len(rows) + 2)
    image_height = 0 if grid is None else 9 * grid.shape[1] / grid.shape[2]
    text_height = 0.135 * (len(lines) + 2) if lines else 0
    edit_grid = None if edits is None else make_grid(edits[0].flatten(0, 1), nrow=len(EDIT_COLUMNS), padding=2,
                                                     pad_value=1)
    edit_height = 0 if edit_grid is None else 4.5 * edit_grid.shape[1] / edit_grid.shape[2]
    curve_height = 3.2 if curve and curve.get("points") else 0
    fig = Figure(figsize=(9, table_height + curve_height + image_height + text_height + edit_height + 0.6),
                 dpi=110)  # no pyplot
    FigureCanvasAgg(fig)
    heights = ([table_height] + ([curve_height] if curve_height else []) + ([image_height] if grid is not None else [])
               + ([text_height] if lines else []) + ([edit_height] if edit_grid is not None else []))
    layout = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    axes = [fig.add_subplot(layout[0])]
    if curve_height:
        draw_curve(list(layout[1].subgridspec(1, 2, wspace=0.3).subplots()), curve)
    axes += [fig.add_subplot(layout[i]) for i in range(1 + bool(curve_height), len(heights))]
    axes[0].axis("off")
    table = axes[0].table(cellText=[list(row[1:]) for row in rows], rowLabels=[row[0] for row in rows],
                          colLabels=scores.headers[1:], loc="center", cellLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    axes[0].set_title(title, fontsize=10)
    if grid is not None:
        axes[1].imshow(grid.permute(1, 2, 0).numpy())
        axes[1].set_xticks([(i + 0.5) * grid.shape[2] / images.shape[1] for i in range(images.shape[1])],
                           [*COLUMNS, *(f"sample {i + 1}" for i in range(images.shape[1] - len(COLUMNS)))],
                           fontsize=7)
        axes[1].set_yticks([])
        axes[1].set_title("held-out pairs: the truth, the baselines' predictions, the translator's samples", fontsize=9)
    if lines:
        axis = axes[1 + (grid is not None)]
        axis.axis("off")
        axis.set_title("held-out sources: the caption nearest (cosine) to each prediction", fontsize=9)
        axis.text(0, 1, "\n".join(lines), family="monospace", fontsize=7, va="top", transform=axis.transAxes)
    if edit_grid is not None:
        axis, rows_of = axes[-1], edits[0].shape[0]
        axis.imshow(edit_grid.permute(1, 2, 0).numpy())
        axis.set_xticks([(i + 0.5) * edit_grid.shape[2] / len(EDIT_COLUMNS) for i in range(len(EDIT_COLUMNS))],
                        EDIT_COLUMNS, fontsize=7)
        axis.set_yticks([(i + 0.5) * edit_grid.shape[1] / rows_of for i in range(rows_of)], edits[1], fontsize=7)
        axis.set_title("held-out images edited through the residual, beside resampling and the MLP's arithmetic",
                       fontsize=9)
    if note:
        fig.text(0.01, 0.005, textwrap.shorten(note, 160), fontsize=7, color="dimgray")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_png(fig, out)
