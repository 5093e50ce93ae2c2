"""Translators on the Hugging Face Hub: a saved folder in the Hub's layout, its model card, upload and download.

``Translator.save_pretrained(folder)`` writes what ``PyTorchModelHubMixin`` writes for a model (the Hub
shows it as such): ``model.safetensors`` (the translator's weights and its standardisation),
``config.json`` (what rebuilds it: the translator's shape, both experts' identities and options, the
training settings and scores) and ``README.md``, a model card. ``Translator.from_pretrained`` (and
``Translator.load``, ``n2n-translate --run``, ``n2n-eval --run``) take such a folder, a run folder or a
Hub id, which ``huggingface_hub`` downloads once into its cache (and finds there with
``HF_HUB_OFFLINE=1``). Only the translator travels: the experts are loaded as their identities say (a
Hub id, an installed package), or from ``--source-weights`` / ``--target-weights``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from n2n import __version__
from n2n.errors import N2NError
from n2n.shards import write_text_atomic
from n2n.train.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    TrainedFlow,
    load_run,
    model_tensors,
    save_checkpoint,
    trained_flow,
)
from n2n.translate.report import run_summary, score_rows

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells repo ids
CARD = "README.md"


class HubError(N2NError):
    """A translator that cannot be found, downloaded or uploaded; the message names it and the way on."""


# A translator saved for sharing (Translator.save_pretrained; the Hugging Face Hub's layout): the weights and
# standardisation in model.safetensors, what rebuilds it and both experts' identities in config.json.
PRETRAINED_CONFIG, PRETRAINED_WEIGHTS = "config.json", "model.safetensors"
PRETRAINED_KEYS = ("step", "model", "train", "source", "target", "heldout_bpd", "linear_gaussian_bpd")


def save_pretrained(flow: TrainedFlow, folder: Path) -> None:
    """Write ``flow`` as a pretrained folder: ``model.*`` and ``norm.*`` tensors, and a config.json holding
    its header's ``PRETRAINED_KEYS`` (no optimizer state, no view: what sampling needs, and the record)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors(flow.flow, flow.source_norm, flow.target_norm)
    save_checkpoint(folder / PRETRAINED_WEIGHTS, tensors, {"format": "n2n"})
    config = {"n2n_pretrained": 1, "n2n_version": __version__,
              **{key: flow.meta.get(key) for key in PRETRAINED_KEYS}}
    write_text_atomic(folder / PRETRAINED_CONFIG, json.dumps(config, indent=2) + "\n")


def load_pretrained(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and header of a pretrained folder (the header as a checkpoint's, without a view)."""
    try:
        config = json.loads((folder / PRETRAINED_CONFIG).read_text())
        with safe_open(folder / PRETRAINED_WEIGHTS, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise CheckpointError(f"{folder} is not a readable n2n translator ({type(e).__name__}: {e}); save it again "
                              "with Translator.save_pretrained") from e
    if not isinstance(config, dict) or config.get("n2n_pretrained") != 1 or "model" not in config:
        raise CheckpointError(f"{folder / PRETRAINED_CONFIG} is not an n2n translator's config (no n2n_pretrained "
                              "and model entries)")
    return tensors, config


def is_pretrained(run: Path) -> bool:
    """Whether ``run`` is a pretrained folder rather than a run folder (which holds a checkpoint)."""
    return run.is_dir() and not (run / CHECKPOINT).exists() and (run / PRETRAINED_CONFIG).is_file()


def load(run: Path | str, device: str | torch.device = "cpu", checkpoint: str = "best") -> TrainedFlow:
    """A trained translator from a run folder (its ``checkpoint``: ``train.checkpoint.load_run``), a checkpoint
    file, or a saved translator's folder (``save_pretrained``), in eval mode on ``device``."""
    run = Path(run)
    if not is_pretrained(run):
        return load_run(run, device, checkpoint)
    return trained_flow(*load_pretrained(run), run, device)


def locate(run: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            token: str | None = None) -> Path:
    """A run folder, checkpoint file or saved folder as it is; else a Hub id, downloaded into (or, offline,
    found in) the Hugging Face cache. A local path is always tried first."""
    path = Path(run)
    if path.exists() or not HUB_ID.fullmatch(str(run)):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(run), revision=revision, cache_dir=cache_dir, token=token))
    except Exception as err:  # offline and not cached, no such repo, no network: each its own class
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"{run}: no run folder there, and no translator of that id on the Hugging Face Hub "
                       f"({type(err).__name__}: {detail}); give a run folder, a saved translator's folder or a "
                       "Hub id (with HF_HUB_OFFLINE=1, one already in the cache)") from err


def save(flow: TrainedFlow, run: Path, folder: str | os.PathLike, license: str = "other",
         repo_id: str | None = None) -> Path:
    """Write the translator ``flow`` of ``run`` into ``folder`` (created): model.safetensors, config.json,
    README.md."""
    folder = Path(folder)
    save_pretrained(flow, folder)
    write_text_atomic(folder / CARD, model_card(flow, run, license, repo_id))
    return folder


def push(flow: TrainedFlow, run: Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
         license: str = "other", commit_message: str = "Upload n2n translator") -> str:
    """Save into a temporary folder and upload it to the Hub repo ``repo_id`` (created if missing); the
    commit's URL."""
    if not HUB_ID.fullmatch(repo_id):
        raise HubError(f"repo_id {repo_id!r}: give the Hub's owner/name (e.g. you/minilm-to-ae-shapes)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save(flow, run, tmp, license, repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                   repo_type="model")
    return str(getattr(commit, "commit_url", commit))


def model_card(flow: TrainedFlow, run: Path, license: str = "other", repo_id: str | None = None) -> str:
    """The README.md of a saved translator (``flow``, from ``run``): Hub metadata, what it translates, its
    training data and scores (the run's n2n-eval table where it was scored), and how to use it."""
    meta = flow.meta
    source, target = (meta[side].get("expert") or {} for side in ("source", "target"))
    dataset = (meta["target"].get("dataset") or {}).get("name", "?")
    kind = meta["model"].get("translator", "coupling")
    name = repo_id or f"{source.get('spec', '?')} → {target.get('spec', '?')}"
    facts = run_summary(meta, sum(p.numel() for p in flow.flow.parameters()))
    lines = ["---", "library_name: n2n", f"license: {license}",
             "tags:", "- n2n", "- network-to-network", "- conditional-invertible-network", f"- {kind}", "---", "",
             f"# {name}", "",
             f"An n2n translator (network-to-network translation): samples of the latent of **{target.get('spec')}** "
             f"given the latent of **{source.get('spec')}**, learnt from their cached latents with both experts "
             "frozen.", "", *(part for line in facts for part in (line, "")),
             "## Data", "",
             f"Pairs of the `{dataset}` dataset: {meta['source'].get('count', '?')} source rows × "
             f"{meta['target'].get('count', '?')} target rows ({meta['source'].get('dim')} → "
             f"{meta['target'].get('dim')} dims), {meta['train'].get('holdout')} of the keys held out.", ""]
    lines += scores(run)
    usage = repo_id or "PATH/TO/THIS/FOLDER"
    lines += ["## Usage", "", "```python", "import n2n", "",
              f'translator = n2n.Translator.from_pretrained("{usage}")',
              "latents = translator.sample(inputs, n=4)  # inputs: what the source expert reads",
              "images = translator.translate(inputs, n=4)  # where the target expert decodes", "```", "",
              f"or `n2n-translate --run {usage} ...`. The experts load as their identities in config.json say; "
              "give `source_weights=` / `target_weights=` where their weights are local files.", ""]
    return "\n".join(lines)


def scores(run: Path) -> list[str]:
    """The run's n2n-eval table (its eval.json, where it was scored: every row, the dataset's included) as
    Markdown lines; none without it."""
    folder = run if run.is_dir() else run.parent
    report_file = folder / "eval.json"
    if not report_file.is_file() or not ((folder / CHECKPOINT).exists() or is_pretrained(folder)):
        return []
    report = json.loads(report_file.read_text())
    table = score_rows(report)
    caption = [table.caption, ""] if table.caption else []
    return ["## Scores", "", f"`n2n-eval` on {report['translation']['pairs']} held-out pairs at step "
            f"{report['step']}:", "", *table.markdown(), "", *caption]
