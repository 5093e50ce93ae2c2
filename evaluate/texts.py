"""What a person reads of text targets: the captions nearest to a translator's predictions.

A text expert's latent cannot be drawn, but the caption it lies nearest to can be read. For a few
held-out sources n2n-eval shows the true caption, and the held-out caption nearest (by cosine) to the
linear map's and the MLP's predictions and to several of the translator's samples. The texts are read from the
target store's dataset by key and caption number, so nothing but the stores and the dataset is needed.
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from n2n.extract.datasets import read_captions
from n2n.scoring import HeldOut
from n2n.shards import Store


def nearest_captions(held: HeldOut, store: Store, sources: int = 4, samples: int = 4) -> list[dict]:
    """For ``sources`` held-out sources (distinct, spread over the held-out set): the true caption, and for
    the linear map, the MLP and ``samples`` of the translator's samples the nearest held-out caption with its cosine.
    Candidates are the distinct held-out targets, as in the retrieval scores."""
    _, first_of_target = np.unique(held.target_row, return_index=True)
    candidates = held.target[torch.from_numpy(first_of_target)].float()
    _, first_of_source = np.unique(np.stack([held.key, held.source_sub]).T, axis=0, return_index=True)
    spread = np.sort(first_of_source)
    chosen = spread[np.linspace(0, len(spread) - 1, min(sources, len(spread))).astype(int)]
    source = held.source[torch.from_numpy(chosen)]
    predictions = {"linear": held.predictors["linear"](source, 1), "mlp": held.predictors["mlp"](source, 1),
                   "translator": held.predictors["translator"](source, samples)}
    nearest = {}
    for name, predicted in predictions.items():
        cosine = F.normalize(predicted.float(), dim=1) @ F.normalize(candidates, dim=1).T
        best = cosine.max(dim=1)
        nearest[name] = (best.indices.numpy(), best.values.numpy())
    shown = np.unique(np.concatenate([first_of_target[idx] for idx, _ in nearest.values()] + [chosen]))
    text = dict(zip(shown.tolist(), read_captions(store, held.target_row[shown]), strict=True))

    def pick(name: str, i: int) -> dict:
        idx, cos = nearest[name]
        return {"text": text[int(first_of_target[idx[i]])], "cosine": round(float(cos[i]), 4)}

    return [{"key": str(held.key[row]), "truth": text[int(row)], "linear": pick("linear", i), "mlp": pick("mlp", i),
             "translator": [pick("translator", i * samples + j) for j in range(samples)]}
            for i, row in enumerate(chosen)]


def caption_lines(entries: list[dict], width: int = 100) -> list[str]:
    """``nearest_captions`` as lines of text (one block per source) for eval.png, captions cut to ``width``."""
    lines = []
    for entry in entries:
        lines.append(f"{entry['key']}: {textwrap.shorten(entry['truth'], width - len(entry['key']) - 2)}")
        named = [("linear LS", entry["linear"]), ("MLP", entry["mlp"]),
                 *((f"sample {j + 1}", sample) for j, sample in enumerate(_samples(entry)))]
        lines += [f"    {label:<10} {pick['cosine']:5.2f}  {textwrap.shorten(pick['text'], width - 22)}"
                  for label, pick in named]
    return lines


def caption_table(entries: list[dict]) -> Table:
    """``nearest_captions`` as a table for the terminal: per source its true caption, then each prediction's."""
    table = Table(title="held-out sources: the held-out caption nearest (cosine) to each prediction")
    for column, justify in (("source", "left"), ("prediction", "left"), ("cosine", "right"), ("caption", "left")):
        table.add_column(column, justify=justify)
    for entry in entries:
        table.add_row(entry["key"], "true caption", "", entry["truth"], end_section=False)
        named = [("linear LS", entry["linear"]), ("MLP", entry["mlp"]),
                 *((f"sample {j + 1}", sample) for j, sample in enumerate(_samples(entry)))]
        for i, (label, pick) in enumerate(named):
            table.add_row("", label, f"{pick['cosine']:.2f}", pick["text"], end_section=i == len(named) - 1)
    return table


def _samples(entry: dict) -> list:
    """An entry's captions of the translator's samples (``cinn`` in an eval.json written before the rename)."""
    return entry.get("translator", entry.get("cinn", []))
