"""How ``n2n.evaluate`` scores a translation over ``shapes``: what a person would check by eye.

Every shapes item's colour, shape, size and position are known (``attributes.jsonl`` beside each
store), so:
- text -> image: decode samples for held-out captions and let the judge (``shapes_judge``) read
  their attributes. Accuracy counts the attributes a caption names; diversity is the normalised
  entropy of the attributes it leaves open (1 = all values equally often, 0 = always the same).
- image -> text: sample text latents for held-out images and retrieve the nearest held-out caption;
  it is right when every attribute it names matches the image.
Each predictor ``n2n.evaluate`` hands over (the run's translator and the MLP baseline) is scored the same way.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from n2n.errors import N2NError
from n2n.extract.datasets.shapes_judge import DEFAULT_PATH, IMAGE_SIZE, ShapesJudge, accuracy, load_judge
from n2n.extract.datasets.shapes_world import ATTRIBUTES, COLORS, POSITIONS, SHAPES, SIZES, caption, render
from n2n.extract.experts import Expert
from n2n.scoring import HeldOut, Predictor, ScoreTable, normalized_entropy, uniform_entropy, upgrade_report

CHOICES = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
VALUES = {attr: len(values) for attr, values in CHOICES.items()}
EDITED_IMAGES = 200  # held-out images edited: each attribute its caption names, changed once
EDIT_EXAMPLES = 4  # edits of different images that eval.png draws
REAL_IMAGES = 500  # held-out items whose real image the judge reads, to show it can be trusted
OPEN_CAPTIONS = 64  # captions per attribute left open whose samples measure diversity
CURVE_CAPTIONS = 500  # captions of each point of n2n-eval's curve (a third of the main table's decodes: the demo's
CURVE_OPEN_CAPTIONS = 16  # eval stays within its time), and open captions per attribute


@torch.no_grad()
def judged(judge: ShapesJudge, target: Expert, latents: torch.Tensor, chunk: int = 512) -> dict[str, list[str]]:
    """The judge's reading of decoded latents, resized to the judge's input where the decoder draws another size
    (an autoencoder trained at 32 px)."""
    out: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
    for i in range(0, len(latents), chunk):
        images = target.decode(latents[i : i + chunk]).float()
        if images.ndim == 4 and images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = torch.nn.functional.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                                     antialias=True, align_corners=False).clamp(0, 1)
        for attr, values in judge.predict(images).items():
            out[attr] += values
    return out


def caption_flags(truth: dict[str, dict], keys: np.ndarray, subs: np.ndarray) -> list[dict]:
    """Which attributes each (item, caption number) names."""
    return [truth[str(k)]["captions"][int(s)] for k, s in zip(keys, subs, strict=True)]


def text_to_image_scores(predict: Predictor, judge: ShapesJudge, target: Expert, truth: dict[str, dict],
                         keys: np.ndarray, subs: np.ndarray, c: torch.Tensor, n_open: int, max_rows: int,
                         open_captions: int = OPEN_CAPTIONS) -> dict:
    """Accuracy on named attributes (one sample per caption) and entropy of open ones (n_open samples of up to
    ``open_captions`` captions per attribute)."""
    keys, subs, c = keys[:max_rows], subs[:max_rows], c[:max_rows]
    flags = caption_flags(truth, keys, subs)
    seen = judged(judge, target, predict(c, 1))
    accuracy = {}
    for attr in ATTRIBUTES:
        hits = [seen[attr][i] == truth[str(k)][attr] for i, k in enumerate(keys) if flags[i][attr]]
        accuracy[attr] = float(np.mean(hits)) if hits else None
    diversity = {}
    for attr in ATTRIBUTES:
        open_rows = [i for i, f in enumerate(flags) if not f[attr]][:open_captions]
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


def retrieval_scores(predict: Predictor, truth: dict[str, dict], image_keys: np.ndarray, c: torch.Tensor,
                     caption_latents: torch.Tensor, caption_keys: np.ndarray, caption_subs: np.ndarray, n: int,
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


def text_to_image(held_out: HeldOut, target: Expert) -> dict:
    """The judge on real held-out images (can it be trusted?), then each predictor's samples."""
    truth, options = held_out.source_truth, held_out.options
    judge = load_judge(options.judge or DEFAULT_PATH, console=held_out.console)  # trained once where missing
    real_attrs = [truth[str(k)] for k in np.unique(held_out.key)[:REAL_IMAGES]]
    real = torch.stack([torch.from_numpy(np.asarray(render(a, IMAGE_SIZE), dtype=np.float32) / 255).permute(2, 0, 1)
                        for a in real_attrs])
    report: dict = {"judge_real_accuracy": accuracy(judge, real, real_attrs),
                    "uniform_entropy": {attr: uniform_entropy(VALUES[attr], options.samples) for attr in ATTRIBUTES}}
    for name, predict in held_out.predictors.items():
        report[name] = text_to_image_scores(predict, judge, target, truth, held_out.key, held_out.source_sub,
                                            held_out.source, n_open=options.samples, max_rows=options.max_rows)
    if held_out.edit is not None and held_out.encode_source is not None:
        try:
            report["edits"] = edit_scores(held_out, judge, target)
        except N2NError as err:  # the source expert cannot be loaded here: the rest of the report stands
            report["edits"] = {"note": f"no edits scored: {err}"}
    return report


def source_named(held_out: HeldOut, row: int) -> dict[str, bool]:
    """Which attributes the source of held-out pair ``row`` names: a label source's own attributes, or the
    flags of its caption."""
    fixed = held_out.source_names() if held_out.source_names is not None else None
    if fixed is not None:
        return {attr: attr in fixed for attr in ATTRIBUTES}
    return held_out.source_truth[str(held_out.key[row])]["captions"][int(held_out.source_sub[row])]


def edit_scores(held_out: HeldOut, judge: ShapesJudge, target: Expert) -> dict:
    """Edits of held-out images through the residual, read by the judge. For each of up to ``EDITED_IMAGES``
    images (under its first held-out caption) and each attribute the caption names, the caption is written
    again with that attribute changed to another value; the image is then recombined under it. ``success``:
    the judge reads the new value; ``kept_named`` / ``kept_open``: every other attribute, named in the caption
    or left open, reads as on the real image (open ones only the residual can keep). Beside the edit, two
    baselines: ``resampling`` (a fresh sample under the new caption: what translating does) and
    ``mlp_arithmetic`` (x + g(c') - g(c) with the MLP baseline g)."""
    truth, seed = held_out.source_truth, held_out.options.seed
    _, first = np.unique(held_out.target_row, return_index=True)
    rng = random.Random(f"shapes-edits/{seed}")
    cases, items = [], []  # (held-out row, edited attribute, new value); the new caption as an item
    for row in np.sort(first)[:EDITED_IMAGES]:
        key = str(held_out.key[row])
        named = source_named(held_out, row)
        for attr in (a for a in ATTRIBUTES if named[a]):
            new = rng.choice([value for value in CHOICES[attr] if value != truth[key][attr]])
            attrs = {**truth[key], attr: new}
            cases.append((int(row), attr, new))
            items.append({"text": [caption(attrs, named, rng)], "attributes": {a: attrs[a] for a in ATTRIBUTES},
                          "image": render(attrs, IMAGE_SIZE)})  # whichever the source expert reads
    if not cases:
        return {"images": 0}
    rows = torch.tensor([row for row, _, _ in cases])
    x, c, new_c = held_out.target[rows].float(), held_out.source[rows], held_out.encode_source(items)
    mlp = held_out.predictors["mlp"]
    edited = {"translator": held_out.edit(x, c, new_c), "resampling": held_out.predictors["translator"](new_c, 1),
              "mlp_arithmetic": x + mlp(new_c, 1) - mlp(c, 1)}
    real_attrs = [truth[str(held_out.key[row])] for row, _, _ in cases]
    real = torch.stack([torch.from_numpy(np.asarray(render(a, IMAGE_SIZE), dtype=np.float32) / 255).permute(2, 0, 1)
                        for a in real_attrs])
    original = judge.predict(real)
    report: dict = {"images": len({row for row, _, _ in cases}), "edits": len(cases), "examples": []}
    for (row, attr, new), item in zip(cases, items, strict=True):  # eval.png's row of edits: one per image
        if len(report["examples"]) < EDIT_EXAMPLES and all(e["row"] != row for e in report["examples"]):
            written = {field: value for field, value in item.items() if field != "image"}  # eval.json holds text
            report["examples"].append({"row": row, "item": written, "label": f"{attr} → {new}"})
    for name, latents in edited.items():
        seen = judged(judge, target, latents)
        success = {attr: [seen[attr][i] == new for i, (_, a, new) in enumerate(cases) if a == attr]
                   for attr in ATTRIBUTES}
        kept: dict[str, list[bool]] = {"named": [], "open": [], **{f"open_{a}": [] for a in ATTRIBUTES}}
        for i, (row, attr, _) in enumerate(cases):
            named = source_named(held_out, row)
            for other in (o for o in ATTRIBUTES if o != attr):
                same = seen[other][i] == original[other][i]
                kept["named" if named[other] else "open"].append(same)
                if not named[other]:
                    kept[f"open_{other}"].append(same)
        mean = {what: float(np.mean(values)) if values else None for what, values in kept.items()}
        report[name] = {"success": {a: float(np.mean(v)) if v else None for a, v in success.items()},
                        "kept_named": mean["named"], "kept_open": mean["open"],
                        "kept_open_by_attribute": {a: mean[f"open_{a}"] for a in ATTRIBUTES}}
    return report


def image_to_text_args(held_out: HeldOut) -> tuple:
    """``retrieval_scores``' arguments after the predictor: one source row per held-out image; the bank is every
    held-out caption's latent, once."""
    first = np.r_[True, held_out.key[1:] != held_out.key[:-1]]
    _, caption = np.unique(held_out.target_row, return_index=True)
    return (held_out.target_truth, held_out.key[first], held_out.source[torch.from_numpy(first)],
            held_out.target[caption], held_out.key[caption], held_out.target_sub[caption])


def image_to_text(held_out: HeldOut) -> dict:
    """Each predictor's ``retrieval_scores`` over the held-out images."""
    args = image_to_text_args(held_out)
    return {name: retrieval_scores(predict, *args, n=held_out.options.samples, max_rows=held_out.options.max_rows)
            for name, predict in held_out.predictors.items()}


class ShapesScorer:
    """``ShapesDataset.translation_scorer``: text -> image where the target expert decodes, else image -> text."""

    def score(self, held_out: HeldOut) -> dict:
        """The entries of eval.json; {} for a run without ground truth on the sides it needs."""
        if held_out.source_truth is None and held_out.target_truth is None:
            return {}
        target = held_out.target_expert()
        if target.can_decode and held_out.source_truth is not None:
            return text_to_image(held_out, target)
        if held_out.source_truth is not None and held_out.target_truth is not None:
            return image_to_text(held_out)
        return {}

    def curve_point(self, held_out: HeldOut, predict: Predictor) -> dict:
        """One point of n2n-eval's fidelity–diversity curve: ``{"judge", "open_entropy"}``. Text -> image: the
        judge's accuracy on named attributes (their mean; one sample per caption, up to CURVE_CAPTIONS) and the
        mean entropy of the open ones (``samples`` per caption, CURVE_OPEN_CAPTIONS captions per attribute);
        image -> text: how often the caption nearest one sample fits the
        image (open: none, an image leaves nothing open)."""
        target = held_out.target_expert()
        options = held_out.options
        if target.can_decode and held_out.source_truth is not None:
            judge = load_judge(options.judge or DEFAULT_PATH, console=held_out.console)
            scores = text_to_image_scores(predict, judge, target, held_out.source_truth, held_out.key,
                                          held_out.source_sub, held_out.source, n_open=options.samples,
                                          max_rows=min(options.max_rows, CURVE_CAPTIONS),
                                          open_captions=CURVE_OPEN_CAPTIONS)
            return {"judge": _mean(scores["accuracy"].values()), "open_entropy": _mean(scores["open_entropy"].values())}
        if held_out.source_truth is not None and held_out.target_truth is not None:
            scores = retrieval_scores(predict, *image_to_text_args(held_out), n=1, max_rows=options.max_rows)
            return {"judge": scores["accuracy"], "open_entropy": None}
        return {}

    def read_decoded(self, target: Expert, latents: torch.Tensor, judge: Path | None = None,
                     console: Console | None = None) -> dict[str, list[str]]:
        """The judge's reading of colour, shape, size and position off what ``target`` decodes from ``latents``
        (n2n-diagnose; the judge is trained first, in about a minute, where ``judge`` holds none)."""
        return judged(load_judge(judge or DEFAULT_PATH, console=console), target, latents)

    def table(self, report: dict) -> ScoreTable:
        report = upgrade_report(report)  # an eval.json of any version
        if "judge_real_accuracy" in report:
            return _text_to_image_table(report)
        if "translator" in report:
            return ScoreTable([("nearest caption fits the image", _percent(report["translator"]["accuracy"]),
                                _percent(report["mlp"]["accuracy"]))],
                              f"a random caption fits {100 * report['translator']['chance']:.1f}% of the time")
        return ScoreTable()


def _mean(values: object) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _text_to_image_table(report: dict) -> ScoreTable:
    models = (report["translator"], report["mlp"])
    rows = [(f"{attr} accuracy (named)", *(_percent(m["accuracy"][attr]) for m in models)) for attr in ATTRIBUTES]
    rows += [(f"{attr} entropy (open; perfect {report['uniform_entropy'][attr]:.2f})",
              *("-" if m["open_entropy"][attr] is None else f"{m['open_entropy'][attr]:.2f}" for m in models))
             for attr in ATTRIBUTES]
    judge = ", ".join(f"{a} {100 * v:.1f}%" for a, v in report["judge_real_accuracy"].items())
    edits = report.get("edits") or {}
    if edits.get("edits"):
        ours, arithmetic, resampling = edits["translator"], edits["mlp_arithmetic"], edits["resampling"]
        rows += [(f"edit {attr}: success", *(_percent(m["success"][attr]) for m in (ours, arithmetic)))
                 for attr in ATTRIBUTES]
        rows += [(f"edit: {what} attributes kept", *(_percent(m[f"kept_{what}"]) for m in (ours, arithmetic)))
                 for what in ("named", "open")]
        mean = np.mean([v for v in resampling["success"].values() if v is not None])
        rows += [("edit by resampling: success, named kept, open kept",
                  f"{_percent(mean)}, {_percent(resampling['kept_named'])}, {_percent(resampling['kept_open'])}",
                  "")]
        judge += (f"; {edits['edits']} edits of {edits['images']} held-out images through the residual, the MLP "
                  "column by latent arithmetic x + g(c') - g(c)")
    return ScoreTable(rows, f"judge on real held-out images: {judge}")
