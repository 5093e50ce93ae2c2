"""n2n-eval: how good is a trained translator, measured on its view's held-out keys.

Always: held-out NLL in bits/dim. On the shapes dataset, where every item's colour, shape, size
and position are known, also what a person would check by eye:
- text -> image: decode samples for held-out captions and let the judge read their attributes.
  Accuracy counts the attributes a caption names; diversity is the normalised entropy of the
  attributes it leaves open (1 = all values equally often, 0 = always the same).
- image -> text: sample text latents for held-out images and retrieve the nearest held-out caption;
  it is right when every attribute it names matches the image.
Both are compared with the deterministic MLP baseline trained on the same view (the paper's
cINN-vs-MLP comparison). Everything is computed from the stores: no source expert is run.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import click
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from n2n.extract.datasets.shapes import COLORS, POSITIONS, SHAPES, SIZES
from n2n.extract.experts import ExpertError
from n2n.shards.store import StoreError, as_path, write_json_atomic
from n2n.train.checkpoint import CheckpointError, TrainedFlow, load_run
from n2n.train.data import load_pairs
from n2n.train.trainer import heldout_bpd
from n2n.translate.baseline import train_mlp
from n2n.translate.pipeline import TranslateError, expert_of

ATTRIBUTES = ("color", "shape", "size", "position")
VALUES = {"color": len(COLORS), "shape": len(SHAPES), "size": len(SIZES), "position": len(POSITIONS)}
console = Console(stderr=True)


def read_attributes(store_path: Path) -> dict[str, dict] | None:
    """Ground truth per key, written beside a store by n2n-extract for datasets that have it."""
    path = as_path(store_path) / "attributes.jsonl"
    if not path.exists():
        return None
    return {row["key"]: row for row in map(json.loads, path.read_text().splitlines())}


def normalized_entropy(values: list[str], n_values: int) -> float:
    counts = np.array(list(Counter(values).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(n_values))


def uniform_entropy(n_values: int, n_samples: int, trials: int = 4000, seed: int = 0) -> float:
    """What a perfect sampler scores: the mean normalised entropy of ``n_samples`` uniform draws.

    Below 1 because a few samples rarely cover every value (16 draws over 9 positions: 0.87), so a
    diversity score is read against this, not against 1.
    """
    draws = np.random.default_rng(seed).integers(n_values, size=(trials, n_samples))
    p = (draws[..., None] == np.arange(n_values)).mean(1)
    logs = np.log(np.where(p > 0, p, 1.0))
    return float(-(p * logs).sum(1).mean() / math.log(n_values))


@torch.no_grad()
def sample_standardized(translator: TrainedFlow, c: torch.Tensor, n: int, temperature: float,
                        generator: torch.Generator) -> torch.Tensor:
    """n target latents (stored units) per standardised source row: [len(c) * n, dim], row-major."""
    repeated = c.repeat_interleave(n, dim=0)
    return translator.target_norm.inverse(translator.flow.sample(repeated, temperature, generator))


@torch.no_grad()
def judged(judge, target, latents: torch.Tensor, chunk: int = 512) -> dict[str, list[str]]:
    """The judge's reading of decoded latents."""
    out: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
    for i in range(0, len(latents), chunk):
        for attr, values in judge.predict(target.decode(latents[i : i + chunk]).float()).items():
            out[attr] += values
    return out


def caption_flags(truth: dict[str, dict], keys: np.ndarray, subs: np.ndarray) -> list[dict]:
    return [truth[str(k)]["captions"][int(s)] for k, s in zip(keys, subs, strict=True)]


def text_to_image_scores(predict, judge, target, truth, keys, subs, c, n_open: int, max_rows: int) -> dict:
    """Accuracy on named attributes (one sample per caption) and entropy of open ones (n_open samples)."""
    keys, subs, c = keys[:max_rows], subs[:max_rows], c[:max_rows]
    flags = caption_flags(truth, keys, subs)
    seen = judged(judge, target, predict(c, 1))
    accuracy = {}
    for attr in ATTRIBUTES:
        hits = [seen[attr][i] == truth[str(k)][attr] for i, k in enumerate(keys) if flags[i][attr]]
        accuracy[attr] = float(np.mean(hits)) if hits else None
    diversity = {}
    for attr in ATTRIBUTES:
        open_rows = [i for i, f in enumerate(flags) if not f[attr]][:64]
        if not open_rows:
            diversity[attr] = None
            continue
        values = judged(judge, target, predict(c[open_rows], n_open))[attr]
        per_caption = [values[j * n_open : (j + 1) * n_open] for j in range(len(open_rows))]
        diversity[attr] = float(np.mean([normalized_entropy(v, VALUES[attr]) for v in per_caption]))
    return {"accuracy": accuracy, "open_entropy": diversity, "captions": len(keys)}


def consistent(truth: dict[str, dict], image_key: str, caption_key: str, caption_sub: int) -> bool:
    """A caption fits an image when every attribute it names matches the image's."""
    named = truth[caption_key]["captions"][caption_sub]
    return all(truth[caption_key][a] == truth[image_key][a] for a in ATTRIBUTES if named[a])


def retrieval_scores(predict, truth, image_keys, c, caption_latents, caption_keys, caption_subs, n: int,
                     max_rows: int) -> dict:
    """image -> text: each sampled text latent retrieves its nearest held-out caption (cosine)."""
    image_keys, c = image_keys[:max_rows], c[:max_rows]
    bank = torch.nn.functional.normalize(torch.as_tensor(caption_latents).float(), dim=1)
    sampled = torch.nn.functional.normalize(predict(c, n), dim=1)
    nearest = (sampled @ bank.T).argmax(1).numpy()
    hits = [consistent(truth, str(image_keys[i // n]), str(caption_keys[j]), int(caption_subs[j]))
            for i, j in enumerate(nearest)]
    chance = np.mean([consistent(truth, str(k), str(ck), int(cs)) for k in image_keys[:50]
                      for ck, cs in zip(caption_keys, caption_subs, strict=True)])
    return {"accuracy": float(np.mean(hits)), "chance": float(chance), "images": len(image_keys)}


def evaluate(run: Path, samples: int = 16, temperature: float = 1.0, max_rows: int = 1000, seed: int = 0,
             baseline_steps: int = 2000, judge_path: Path = Path("experts/judge-shapes")) -> dict:
    """All metrics of one run, as the dict written to eval.json."""
    translator = load_run(run)
    meta = translator.meta
    data = load_pairs(meta["view"], meta["train"]["holdout"], (translator.source_norm, translator.target_norm))
    report: dict = {"run": str(run), "view": meta["view"], "step": meta["step"],
                    "heldout_bpd": heldout_bpd(translator.flow, data, rows=len(data.held_target))}
    source_truth, target_truth = read_attributes(data.view.source.path), read_attributes(data.view.target.path)
    if source_truth is None and target_truth is None:
        return report  # not a dataset with ground truth: the NLL is the measure
    target = expert_of(meta["target"], "target", None, console)
    generator = torch.Generator().manual_seed(seed)
    mlp = train_mlp(data, steps=baseline_steps, seed=seed)
    cinn = lambda c, n: sample_standardized(translator, c, n, temperature, generator)  # noqa: E731
    regress = lambda c, n: data.target_norm.inverse(mlp(c)).repeat_interleave(n, 0)  # noqa: E731
    source_rows, _ = data.held_rows
    subs = data.view.source.sub[source_rows]
    if target.can_decode and source_truth is not None:
        from n2n.extract.datasets.shapes import render
        from n2n.extract.datasets.shapes_judge import accuracy, load_judge

        judge = load_judge(judge_path, console=console)  # trained once (about a minute) where missing
        real_attrs = [source_truth[str(k)] for k in np.unique(data.held_key)[:500]]
        real = torch.stack([torch.from_numpy(np.asarray(render(a, 64), dtype=np.float32) / 255).permute(2, 0, 1)
                            for a in real_attrs])
        report["judge_real_accuracy"] = accuracy(judge, real, real_attrs)
        report["uniform_entropy"] = {attr: uniform_entropy(VALUES[attr], samples) for attr in ATTRIBUTES}
        args = (judge, target, source_truth, data.held_key, subs, data.held_source)
        report["cinn"] = text_to_image_scores(cinn, *args, n_open=samples, max_rows=max_rows)
        report["mlp"] = text_to_image_scores(regress, *args, n_open=samples, max_rows=max_rows)
    elif target_truth is not None and source_truth is not None:
        first = np.r_[True, data.held_key[1:] != data.held_key[:-1]]  # one row per held-out image
        caption_rows = np.unique(data.held_rows[1])
        bank = data.view.target.latents()[caption_rows]
        bank_keys, bank_subs = data.view.target.keys[caption_rows], data.view.target.sub[caption_rows]
        args = (target_truth, data.held_key[first], data.held_source[first], bank, bank_keys, bank_subs)
        report["cinn"] = retrieval_scores(cinn, *args, n=samples, max_rows=max_rows)
        report["mlp"] = retrieval_scores(regress, *args, n=samples, max_rows=max_rows)
    return report


def print_report(report: dict) -> None:
    table = Table(title=f"n2n-eval {report['run']} (step {report['step']})")
    table.add_column("metric")
    table.add_column("cINN", justify="right")
    table.add_column("MLP baseline", justify="right")
    table.add_row("held-out NLL (bits/dim)", f"{report['heldout_bpd']:.4f}", "")
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    if "judge_real_accuracy" in report:
        for attr in ATTRIBUTES:
            table.add_row(f"{attr} accuracy (named)", fmt(report["cinn"]["accuracy"][attr]),
                          fmt(report["mlp"]["accuracy"][attr]))
        for attr in ATTRIBUTES:
            ent = [r["open_entropy"][attr] for r in (report["cinn"], report["mlp"])]
            table.add_row(f"{attr} entropy (open; perfect {report['uniform_entropy'][attr]:.2f})",
                          *("-" if e is None else f"{e:.2f}" for e in ent))
        judge = ", ".join(f"{a} {100 * v:.1f}%" for a, v in report["judge_real_accuracy"].items())
        table.caption = f"judge on real held-out images: {judge}"
    elif "cinn" in report:
        table.add_row("nearest caption fits the image", fmt(report["cinn"]["accuracy"]),
                      fmt(report["mlp"]["accuracy"]))
        table.caption = f"a random caption fits {100 * report['cinn']['chance']:.1f}% of the time"
    Console().print(table)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--run", required=True, type=click.Path(path_type=Path), help="Run folder of n2n-train.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: RUN/eval.json]")
@click.option("--samples", default=16, help="Samples per caption for the entropy of open attributes (a perfect "
              "sampler scores below 1 with few samples; the table prints what it would score).")
@click.option("--temperature", default=1.0)
@click.option("--max-rows", default=1000, help="Held-out captions (or images) scored.")
@click.option("--seed", default=0)
@click.option("--baseline-steps", default=2000, help="Training steps of the MLP baseline.")
@click.option("--judge", "judge_path", type=click.Path(path_type=Path), default=Path("experts/judge-shapes"),
              help="The shapes attribute judge; trained there first if missing.")
def main(run: Path, out: Path | None, samples: int, temperature: float, max_rows: int, seed: int,
         baseline_steps: int, judge_path: Path) -> None:
    """Score a trained run on its held-out keys and write eval.json (see the module docstring)."""
    try:
        report = evaluate(run, samples, temperature, max_rows, seed, baseline_steps, judge_path)
    except (CheckpointError, StoreError, ExpertError, TranslateError) as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    out = out or Path(run) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print_report(report)
    console.print(f"wrote {out}")
