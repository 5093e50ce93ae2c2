"""``n2n.evaluate`` / n2n-eval: how good is a trained translator, measured on its view's held-out keys.

Every run, on any view, is read against the simplest translators fitted on the same train split: a
linear map (least squares) and an MLP, and the linear-Gaussian density (the linear map with a
full-covariance Gaussian residual), whose held-out NLL is the floor a flow must clear. For each
translator, on up to ``max_rows`` held-out pairs:

- held-out NLL in bits/dim (the run's translator and the linear-Gaussian floor: the two that are densities);
- retrieval: the rank of the pair's true target among the distinct held-out targets (cosine), from
  one sample and from the mean of ``samples`` samples: top-1, top-5, median rank; mean cosine;
- distribution: the Fréchet distance between one prediction per pair and the true targets, and k-NN
  precision / recall (Kynkäänniemi et al. 2019) of those predictions (``translate.metrics``);
- what the field reports beside: retrieval among 1024 candidates (top-1, mean rank; vec2vec), the
  cosine to an unrelated target (a shuffled pair; DALLE2-pytorch's prior panel), the run's translator's best of
  ``samples`` (the sample closest to the MLP's prediction, as DALLE2-pytorch picks from its prior),
  and a fourth translator, the orthogonal Procrustes map after standard scaling (Maiorca et al. 2023);
  where source and target lie in one space (CLIP's text and image towers), the source itself as a fifth.

What else is worth measuring depends on the data, so the dataset of the run's stores adds it
(``ItemDataset.translation_scorer``): shapes, whose ground truth is known, lets a judge read the
attributes of decoded samples. A scorer is handed the held-out pairs and the predictors, so this
module knows no dataset. Everything is computed from the stores: no source expert is run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from n2n.cli import console
from n2n.errors import N2NError
from n2n.evaluate.baseline import Subspace, fit_procrustes, train_mlp, wide
from n2n.evaluate.curve import Sampler, fidelity_diversity, parse_values
from n2n.evaluate.figures import edit_gallery, eval_figure, gallery
from n2n.evaluate.metrics import (
    LinearGaussian,
    distribution,
    mean_cosine,
    retrieval,
    retrieval_among,
    subsample,
)
from n2n.evaluate.texts import caption_lines, nearest_captions
from n2n.extract.datasets import DatasetError, dataset_class
from n2n.extract.experts import Expert, expert_of, stored_layer
from n2n.options import check_fields, load_options, setting
from n2n.scoring import Editor, HeldOut, Predictor, Predictors, ScoreTable, TranslationScorer
from n2n.shards import as_path, is_remote
from n2n.shards.view import open_view
from n2n.train.checkpoint import CHECKPOINT, CHECKPOINTS, TrainedFlow, read_meta, run_view
from n2n.train.data import PairedLatents, load_pairs
from n2n.train.heldout import (
    FLOOR_ROWS,
    LAW_FILE,
    fit_floor,
    floor_bpd,
    floor_pairs,
    heldout_bpd,
    law_record,
    read_law,
)
from n2n.train.loggers import open_logger
from n2n.translate import hub
from n2n.translate.report import POOL, score_rows

__all__ = ["EvalConfig", "HeldOut", "Predictor", "ScoreTable", "TranslationScorer", "evaluate"]  # the scorer's
# types live in n2n.scoring (stage 1 imports them from there); they stay importable from here

@dataclass(frozen=True)
class EvalConfig:
    """The options of one evaluation, checked when made, before anything is loaded or written."""

    samples: int = setting(16, "Samples per source row where a dataset scores diversity (a perfect sampler "
                           "scores below 1 with few samples; the table prints what it would score).", min=1, max=4096)
    temperature: float = setting(1.0, "Sampling temperature of the run's translator: z ~ N(0, T^2 I).", min=0)
    max_rows: int = setting(1000, "Held-out pairs scored (a seeded subsample of larger views).", min=1)
    seed: int = setting(0, "Seeds the translator's samples and the MLP baseline.", min=0)
    baseline_steps: int = setting(2000, "Training steps of the MLP baseline.", min=1)
    judge: Path | None = setting(None, "A model the dataset scores with, where it has one (shapes: the attribute "
                                       "judge, trained there first if missing) [default: the dataset's own, "
                                       "experts/judge-shapes for shapes].")
    log: bool = setting(True, "Also log the scores to the run's logger (its n2n-train --logger: TensorBoard by "
                              "default), at the run's step.")
    curve_temperatures: str = setting("0,0.1,0.25,0.5,0.75,1", "Temperatures of the fidelity–diversity curve, "
                                      "comma-separated ('' for no curve).")
    curve_guidance: str = setting("2", "Guidances of the curve besides 1, comma-separated, where the run was trained "
                                       "with --cond-dropout ('' for none).")
    checkpoint: str = setting("best", "Which weights of a run folder to score: best (best.safetensors, its best "
                                      "held-out NLL; the last where it has none) or last (checkpoint.safetensors).",
                              choices=CHECKPOINTS)

    def __post_init__(self) -> None:
        check_fields(self)
        try:
            self.temperatures, self.guidances  # noqa: B018  (parsed here: a bad value fails before any work)
        except ValueError as err:
            raise N2NError(str(err)) from None

    @property
    def temperatures(self) -> tuple[float, ...]:
        """The curve's temperatures as numbers."""
        return parse_values(self.curve_temperatures, "curve_temperatures", 0.0)

    @property
    def guidances(self) -> tuple[float, ...]:
        """The curve's guidances besides 1, as numbers."""
        return parse_values(self.curve_guidance, "curve_guidance", 0.0)


# ---------------------------------------------------------------- the dataset's part


def read_attributes(store_path: Path) -> dict[str, dict] | None:
    """Ground truth per key, written beside a store by n2n-extract for datasets that have it."""
    path = as_path(store_path) / "attributes.jsonl"
    if not path.exists():
        return None
    return {row["key"]: row for row in map(json.loads, path.read_text().splitlines())}


def scorer_of(meta: dict) -> TranslationScorer | None:
    """The scorer of the dataset both of a run's stores were extracted from (checkpoint header ``meta``);
    None where the stores name none, or different ones, or the dataset is not installed or has no scorer."""
    names = {(meta[side].get("dataset") or {}).get("name") for side in ("source", "target")}
    if len(names) != 1 or None in names:
        return None
    try:
        cls, _ = dataset_class(names.pop())
    except DatasetError:
        return None
    return cls.translation_scorer()


def held_out(trained: TrainedFlow, data: PairedLatents, cfg: EvalConfig, floor: LinearGaussian,
             quiet: bool, subspace: Subspace | None = None) -> HeldOut:
    """The held-out pairs of ``data`` with the run's translator (``trained``), the linear map (the mean of the
    linear-Gaussian ``floor``) and a freshly trained MLP baseline as predictors; where a ``subspace`` is given,
    the MLP regresses the targets' coordinates there and the distribution scores are measured on them."""
    generator = torch.Generator().manual_seed(cfg.seed)
    mlp = functools.cache(lambda: train_mlp(data, steps=cfg.baseline_steps, seed=cfg.seed,  # trained if used
                                            subspace=subspace))

    translator = sampler(trained, cfg.seed, generator)(cfg.temperature, 1.0)

    @torch.no_grad()
    def regress(c: torch.Tensor, n: int) -> torch.Tensor:
        return data.target_norm.inverse(mlp()(c)).repeat_interleave(n, 0)

    def linear(c: torch.Tensor, n: int) -> torch.Tensor:
        return data.target_norm.inverse(floor.mean(c)).repeat_interleave(n, 0)

    view, (source_rows, target_rows) = data.view, data.held_rows
    target = functools.cache(lambda: expert_of(trained.meta["target"], "target", None, console(),
                                               store=view.target.path))
    source = functools.cache(lambda: expert_of(trained.meta["source"], "source", None, console(),
                                               store=view.source.path))
    return HeldOut(key=data.held_key, source_sub=view.source.sub[source_rows], target_sub=view.target.sub[target_rows],
                   target_row=target_rows, source=data.held_source[:],
                   target=data.held_target.latents[torch.from_numpy(target_rows)],
                   predictors=Predictors(translator=translator, linear=linear, mlp=regress), target_expert=target,
                   target_store=view.target,
                   source_truth=read_attributes(view.source.path), target_truth=read_attributes(view.target.path),
                   options=cfg, console=None if quiet else console(), encode_source=source_encoder(trained, source),
                   edit=editor(trained), source_names=lambda: getattr(source(), "attributes", None),
                   project=None if subspace is None else lambda x: subspace.coordinates(data.target_norm(x.float())))


def sampler(trained: TrainedFlow, seed: int, generator: torch.Generator | None = None) -> Sampler:
    """(temperature, guidance) -> the run's translator as a ``Predictor`` sampling so, in stored units. Each
    predictor draws from ``generator`` where given (the main table's, one stream), else from a generator of its
    own seeded by ``seed`` (the curve's points: each from the same noise)."""
    def at(temperature: float, guidance: float) -> Predictor:
        draws = generator or torch.Generator().manual_seed(seed)
        options = {"guidance": guidance} if guidance != 1.0 else {}

        @torch.no_grad()
        def predict(c: torch.Tensor, n: int) -> torch.Tensor:
            z = trained.flow.sample(c.repeat_interleave(n, dim=0), temperature, draws, **options)
            return trained.target_norm.inverse(z)

        return predict

    return at


def curve(held: HeldOut, trained: TrainedFlow, cfg: EvalConfig, scorer: TranslationScorer | None) -> dict:
    """``evaluate.curve.fidelity_diversity`` of the run: its guidances only where it samples with guidance."""
    guidances = cfg.guidances if "guidance" in trained.flow.sampling else ()
    say = None if held.console is None else (lambda text: held.console.print(f"[dim]{text}"))
    return fidelity_diversity(held, sampler(trained, cfg.seed), cfg.temperatures, guidances, scorer, say)


def source_encoder(trained: TrainedFlow, expert: Callable[[], Expert]) -> Callable[[list[dict]], torch.Tensor]:
    """Dataset-like items -> standardised source latents, through the run's source ``expert`` (loaded on first
    call: a scorer that edits asks for new sources; nothing else in the evaluation runs an expert)."""

    @torch.no_grad()
    def encode(items: list[dict]) -> torch.Tensor:
        source = expert()
        try:
            latents = source.encode_items(items, stored_layer(trained.meta["source"], source))
        except KeyError as err:
            raise N2NError(f"the source expert {source.spec} reads {source.modality!r}, which the scorer's new "
                           f"sources lack ({err})") from None
        return trained.source_norm(latents)

    return encode


def editor(trained: TrainedFlow) -> Editor:
    """The run's edit on latents: each target's residual under its source, recombined under the new one."""
    @torch.no_grad()
    def edit(target: torch.Tensor, source: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        v = trained.flow.residual(trained.target_norm(target.float()), source)
        return trained.target_norm.inverse(trained.flow.reverse(v, new))

    return edit


# ---------------------------------------------------------------- every view's part





SAMPLE_NUMBERS = 2**27  # the most numbers of one predictor's draws held at once (512 MiB in float32)
MEAN_OF = {"retrieval": "retrieval_mean", "cosine": "cosine_mean", "cosine_unrelated": "cosine_mean_unrelated"}


def translation_scores(held: HeldOut, baselines: dict[str, Predictor] | None = None) -> dict:
    """Retrieval, cosine, Fréchet distance and precision/recall of every predictor and of ``baselines``
    (translators scored here only, not by the dataset: Procrustes), see the module docstring, on a seeded
    subsample of ``max_rows`` held-out pairs; candidates are all distinct held-out targets. A predictor's
    ``samples`` draws per row are at most SAMPLE_NUMBERS numbers in all (a 65,536-dim target's 2,000 rows get
    1, not 16: then the mean of one is the one sample): ``samples`` in the result says how many were drawn."""
    cfg = held.options
    rows = torch.from_numpy(subsample(len(held.key), cfg.max_rows, cfg.seed))
    distinct, first, truth = np.unique(held.target_row, return_index=True, return_inverse=True)
    candidates, target = held.target[torch.from_numpy(first)].float(), held.target[rows].float()
    truth, source = truth[rows.numpy()], held.source[rows]
    n = max(1, min(cfg.samples, SAMPLE_NUMBERS // (len(rows) * target.shape[1])))
    unrelated = target[torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))]
    report: dict = {"pairs": len(rows), "candidates": len(distinct), "samples": n}
    predictions = {}

    def point(prediction: torch.Tensor) -> dict:
        """The scores of one prediction a row (the one sample, or the mean of the samples)."""
        return {"retrieval": retrieval(prediction, truth, candidates), "cosine": mean_cosine(prediction, target),
                "cosine_unrelated": mean_cosine(prediction, unrelated)}

    for name, predict in {**held.predictors, **(baselines or {})}.items():
        one = predict(source, 1).float()
        # one sample a row (a wide target's budget): its mean is the sample, scored once
        draws = predict(source, n).float().reshape(len(rows), n, -1) if n > 1 else one[:, None]
        predictions[name] = draws
        scores = point(one)
        mean = point(draws.mean(1)) if n > 1 else scores
        report[name] = {**scores, **{MEAN_OF[key]: value for key, value in mean.items()},
                        "retrieval_pool": retrieval_among(one, truth, candidates, POOL, cfg.seed),
                        **distribution(target, one, held.project)}
    if "translator" in predictions and "mlp" in predictions:
        best = best_of(predictions["translator"], predictions["mlp"][:, 0])
        report["translator"] |= {"retrieval_best": retrieval(best, truth, candidates),
                           "cosine_best": mean_cosine(best, target)}
    return report


def best_of(draws: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Of ``draws`` [N, n, d], the one per row with the highest cosine to ``reference`` [N, d]."""
    cosine = torch.nn.functional.cosine_similarity(draws, reference[:, None], dim=2)
    return draws[torch.arange(len(draws)), cosine.argmax(1)]


# ---------------------------------------------------------------- the API


def evaluate(run: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
             figure: str | os.PathLike | None = None, progress: bool = True,
             shards: str | os.PathLike | None = None, **options: object) -> dict:
    """Every metric of the run in folder ``run``, as the dict n2n-eval writes to eval.json.

    ``run``: a run folder, or a saved translator (``Translator.save_pretrained``: its folder or Hub id),
    which records no view: ``shards`` then names a view of the same two experts to score it on (for a run,
    ``shards`` replaces the view it was trained on). Its held-out pairs are the keys the translator's
    ``holdout`` held out.

    ``{"run", "view", "step", "heldout_bpd", "linear_gaussian_bpd", "translation"}`` for every run
    (``translation``: each translator's scores, see the module docstring), plus the entries of the
    scorer of the run's dataset, and where the target expert reads text ``captions``: for a few held-out
    sources the true caption and the captions nearest to each translator's predictions
    (``translate.texts``). ``figure``: also draw the table there as a PNG, with decoded samples
    of a few held-out pairs where the target expert decodes (``translate.figures``). Every number is
    checked first: an ``N2NError`` names the argument and its range before anything is loaded.
    ``progress=False`` keeps the console quiet. ``options`` are ``EvalConfig``'s fields (``samples``,
    ``temperature``, ``max_rows``, ``seed``, ``baseline_steps``, ``judge``), n2n-eval's options;
    ``config``: a YAML file of them (and ``run``), which keyword arguments override.
    """
    # "out" is n2n-eval's (where eval.json goes): a config file written for the command may name it
    mine, (settings,) = load_options(config, {"run": run, "shards": shards, **options}, EvalConfig,
                                     own={"run": None, "shards": None, "out": None})
    run, shards = mine["run"], mine["shards"]
    if run is None:
        raise N2NError("no run to evaluate: give one (run=...), or a config file that names it")
    if settings.get("judge") is not None:
        settings["judge"] = Path(settings["judge"])
    cfg = EvalConfig(**settings)
    run = hub.locate(run)
    trained = hub.load(run, checkpoint=cfg.checkpoint)
    meta = trained.meta
    view = run_view(meta, run) if shards is None else same_experts(meta, as_path(shards))
    data = load_pairs(view, meta["train"]["holdout"], (trained.source_norm, trained.target_norm))
    rows = len(data.held_target)
    if rows == 0:
        raise N2NError(f"{run}: its view has no held-out pairs to score (the run was trained with holdout "
                       f"{meta['train']['holdout']}); train with --holdout above 0")
    # One fit serves the floor and the linear baseline: on the targets the flow trained on (with its target
    # noise), as n2n-train's floor is.
    noise = meta["train"].get("target_noise", 0.0)
    floor = read_law(Path(run) / LAW_FILE, law_record(data, cfg.seed, noise)) if shards is None else None
    floor = floor or fit_floor(data, seed=cfg.seed, noise=noise)  # a low-rank law n2n-train fitted is read back
    report: dict = {"run": str(run), "view": str(view), "step": meta["step"], "checkpoint": cfg.checkpoint,
                    "kind": trained.flow.KIND, "heldout_bpd": heldout_bpd(trained.flow, data, rows=rows),
                    "linear_gaussian_bpd": floor_bpd(floor, data, rows)}
    subspace = Subspace.fit(data.target, seed=cfg.seed) if wide(data) else None
    held = held_out(trained, data, cfg, floor, quiet=not progress, subspace=subspace)
    if subspace is not None:
        report["subspace"] = subspace.describe()
    report["translation"] = translation_scores(held, {"procrustes": procrustes_predictor(data, cfg),
                                                      **source_predictor(data)})
    scorer = scorer_of(meta)
    if scorer is not None:
        report |= scorer.score(held)
        report["dataset_table"] = dataclasses.asdict(scorer.table(report))  # so that the report reads whole alone
    if cfg.temperatures:
        report["curve"] = curve(held, trained, cfg, scorer)
    report |= read_texts(held)
    if figure is not None:
        report["figure"] = str(draw(report, held, Path(figure)))
    if cfg.log:
        log_report(Path(run), meta, report)
    return report


def same_experts(meta: dict, view: Path) -> Path:
    """``view``, where its two stores come from the experts (spec, weights digest, layer) the translator was
    trained on; else an N2NError naming both pairs."""
    stores = open_view(view)
    wanted = [meta[side].get("expert") or {} for side in ("source", "target")]
    found = [store.meta.get("expert") or {} for store in (stores.source, stores.target)]
    keys = ("spec", "digest", "layer")
    if any({k: a.get(k) for k in keys} != {k: b.get(k) for k in keys} for a, b in zip(wanted, found, strict=True)):
        names = lambda pair: " -> ".join(str(e.get("spec")) for e in pair)  # noqa: E731
        raise N2NError(f"--shards {view} pairs {names(found)}, the translator translates {names(wanted)} (or the "
                       "weights differ): give a view of the translator's own two experts")
    return view


def log_report(run: Path, meta: dict, report: dict) -> None:
    """Every number of ``report`` to the run's logger as ``eval/...`` at the run's step, so that the scores sit
    beside the training curves (TensorBoard, W&B). Runs trained before loggers existed log nothing, and so
    does a saved translator (its folder may be the Hub's cache)."""
    name = meta["train"].get("logger", "none")
    if name == "none" or is_remote(run) or hub.is_pretrained(run):
        return
    logger = open_logger(name, run if run.is_dir() else run.parent)
    try:
        logger.scalars(report["step"], {k: v for k, v in numbers(report, "eval") if k != "eval/step"})
    finally:
        logger.close()


def numbers(entry: object, prefix: str) -> list[tuple[str, float]]:
    """The numeric leaves of a report as (``prefix/key/.../key``, value); texts and lists left out."""
    if isinstance(entry, bool) or not isinstance(entry, dict | int | float):
        return []
    if not isinstance(entry, dict):
        return [(prefix, float(entry))]
    return [leaf for key, value in entry.items() for leaf in numbers(value, f"{prefix}/{key}")]


def procrustes_predictor(data: PairedLatents, cfg: EvalConfig) -> Predictor:
    """The orthogonal Procrustes map (``baseline.fit_procrustes``) fitted on the floor's train pairs, as a
    predictor of target latents in stored units (n copies of one prediction)."""
    source, target, _ = floor_pairs(data, FLOOR_ROWS, cfg.seed)
    rotate = fit_procrustes(source, target)
    return lambda c, n: data.target_norm.inverse(rotate(c)).repeat_interleave(n, 0)


def source_predictor(data: PairedLatents) -> dict[str, Predictor]:
    """``{"source": the source latent itself}`` where source and target lie in one space (both stores record
    the same ``Expert.space``, as CLIP's two towers do): the translator that does nothing, which a
    translator between them must beat (DALLE2-pytorch's prior panel reports it); else {}."""
    source, target = data.view.source, data.view.target
    space, target_space = ((store.meta.get("expert") or {}).get("space") for store in (source, target))
    if space is None or space != target_space or source.dim != target.dim:
        return {}
    return {"source": lambda c, n: data.source_norm.inverse(c).repeat_interleave(n, 0)}


def read_texts(held: HeldOut) -> dict:
    """Where the target expert reads text: ``{"captions": nearest_captions(...)}``, what a person reads of
    the predictions; ``{"captions_note": why not}`` where the captions cannot be read; else {}."""
    try:
        if held.target_expert().modality != "text":
            return {}
        return {"captions": nearest_captions(held, held.target_store)}
    except N2NError as err:
        return {"captions_note": f"no captions shown: {err}"}


def draw(report: dict, held: HeldOut, out: Path) -> Path:
    """eval.png: the report's table, and decoded held-out samples where the target expert decodes, or the
    captions nearest to the predictions where it reads text (a note says why neither where it cannot)."""
    images, note, lines = None, report.get("captions_note"), None
    try:
        if held.target_expert().can_decode:
            images = gallery(held)
        elif "captions" in report:
            lines = caption_lines(report["captions"])
        elif note is None:
            note = f"no samples drawn: the target expert {held.target_expert().spec} does not decode"
    except N2NError as err:
        note = f"no samples drawn: {err}"
    edits = None
    examples = (report.get("edits") or {}).get("examples")
    if examples and held.edit is not None and held.encode_source is not None:
        try:
            edits = edit_gallery(held, examples)
        except N2NError as err:
            note = f"no edits drawn: {err}"
    pairs = report["translation"]["pairs"]
    title = f"n2n-eval {Path(report['run']).name} (step {report['step']}): {pairs} held-out pairs"
    return eval_figure(title, score_rows(report), images, note, out, lines, edits, report.get("curve"))


def dataset_table(report: dict) -> ScoreTable:
    """The dataset's rows of a report that did not record them (written before n2n-eval did), found through the
    run it names (its checkpoint's header, not its tensors); a note instead where that run can no longer be
    read."""
    run = Path(report["run"])
    try:
        scorer = scorer_of(hub.load_pretrained(run)[1] if hub.is_pretrained(run) else
                           read_meta(run / CHECKPOINT if run.is_dir() else run))
    except N2NError as err:
        return ScoreTable(caption=f"only the NLL is shown: the dataset's scores are printed through the run ({err})")
    return scorer.table(report) if scorer is not None else ScoreTable()
