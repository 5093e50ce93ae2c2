"""``n2n serve``: try translators in a browser, a Gradio page with a tab per run.

Each run (a run folder, a saved translator's folder or its Hub id: whatever ``Translator.load`` takes) is
loaded once, when the server starts, and kept. A text source gets a caption box and the decoded samples
as a gallery (the same pictures as ``Translator.translate`` with the same seed); an image source gets an
upload and, for each sample, the captions of the target store nearest to it, with their cosine. Each tab
also shows what the run is and, where they exist, its ``n2n-eval`` table, ``eval.png`` and ``loss.png``.

Requests run one at a time (Gradio's queue, one worker), so a run's device never holds two batches;
anything a user can get wrong (an empty caption, a file that is not an image, a caption longer than the
source expert reads) is a message on the page, not a stack trace. The server binds to 127.0.0.1 unless
``--host`` says otherwise. Gradio is an optional extra: ``pip install 'n2n[serve]'``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from n2n.cli import CONTEXT, reports_errors
from n2n.errors import N2NError
from n2n.extract.datasets import read_captions
from n2n.options import check_fields, click_options, config_option, load_options, setting
from n2n.shards import Store, open_store
from n2n.translate.pipeline import SamplingConfig, Translator, run_stores
from n2n.translate.report import Scores, run_summary, score_rows

CAPTION_BANK = 50_000  # target-store rows a caption is looked for among (the first ones)
NEAREST = 3  # captions shown per sample


class ServeError(N2NError):
    """A run that cannot be served, or Gradio missing; the message names it and the fix."""


@dataclass
class Served:
    """One run on the page: its translator, where it lives, and the target captions' bank (text targets)."""

    name: str
    translator: Translator
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the sliders' start; steps, guidance
    store: Store | None = None  # the target store, where the run's view is at hand
    bank: torch.Tensor | None = None  # its first rows, L2-normalised, for nearest captions

    @classmethod
    def load(cls, run: str, device: str, sampling: SamplingConfig | None = None) -> Served:
        translator = Translator.load(run, device=device)
        served = cls(Path(str(run).rstrip("/")).name or str(run), translator, sampling or SamplingConfig())
        if translator.target.modality == "text":
            target = run_stores(translator.trained.meta, translator.run)[1]
            if target is not None:
                served.store = open_store(target)
                rows = min(len(served.store), CAPTION_BANK)
                latents = torch.from_numpy(served.store.take(np.arange(rows)).astype(np.float32))
                served.bank = F.normalize(latents, dim=1)
        return served

    # --- what the page asks -------------------------------------------------------------------------

    def check_caption(self, caption: str) -> str:
        """The caption stripped; empty, or longer than the source expert reads, is a ServeError."""
        text = (caption or "").strip()
        if not text:
            raise ServeError("type a caption first")
        source = self.translator.source
        tokenizer, limit = getattr(source, "tokenizer", None), getattr(source, "max_length", None)
        if tokenizer is not None and limit:
            length = len(tokenizer(text)["input_ids"])
            if length > limit:
                raise ServeError(f"the caption is {length} tokens long; {source.spec} reads at most {limit}: "
                                 "shorten it")
        return text

    def edit(self, image: Image.Image, caption: str, new: str) -> list[Image.Image]:
        """The image's reconstruction (its residual under its own caption) and its residual under the new
        caption, decoded: before and after (``Translator.edit``)."""
        caption, new = self.check_caption(caption), self.check_caption(new)
        decoded = self.translator.edit([image], [caption], [caption, new], steps=self.sampling.steps,
                                       guidance=self.sampling.guidance)
        return [Image.fromarray(to_uint8(picture)) for picture in decoded[0]]

    @property
    def edits(self) -> bool:
        """Whether the page offers edits: a caption source and a target that is an image and decodes."""
        return (self.translator.source.modality == "text" and self.translator.target.modality == "image"
                and self.translator.target.can_decode)

    def images(self, inputs: list, n: int, temperature: float, seed: int) -> list[Image.Image]:
        """The decoded samples as PIL images, row-major (input, sample)."""
        decoded = self.translator.translate(inputs, n=n, temperature=temperature, seed=seed,
                                            steps=self.sampling.steps, guidance=self.sampling.guidance)
        flat = decoded.reshape(-1, *decoded.shape[-3:])
        return [Image.fromarray(to_uint8(image)) for image in flat]

    def captions(self, inputs: list, n: int, temperature: float, seed: int) -> list[list]:
        """For each sample, the ``NEAREST`` target-store captions with their cosine: rows of a table."""
        if self.bank is None:
            raise ServeError(f"{self.name}: its view's stores are not here, so there are no captions to show: "
                             "serve the run folder beside its shards/")
        latents = self.translator.sample(inputs, n=n, temperature=temperature, seed=seed, steps=self.sampling.steps,
                                         guidance=self.sampling.guidance).flatten(0, 1)
        cosine = F.normalize(latents.float(), dim=1) @ self.bank.T
        best = cosine.topk(min(NEAREST, len(self.bank)), dim=1)
        rows = np.unique(best.indices.numpy())
        text = dict(zip(rows.tolist(), read_captions(self.store, rows), strict=True))
        return [[i + 1, rank + 1, round(float(c), 3), text[int(r)]]
                for i, (idx, cos) in enumerate(zip(best.indices, best.values, strict=True))
                for rank, (r, c) in enumerate(zip(idx, cos, strict=True))]

    def about(self) -> str:
        """What the run is, as Markdown (``translate.report.run_summary``, as the model card says it)."""
        trained = self.translator.trained
        facts = run_summary(trained.meta, sum(p.numel() for p in trained.flow.parameters()))
        return "\n\n".join([f"**{self.name}**, from `{self.translator.run}`: {facts[0]}", *facts[1:]])

    @property
    def folder(self) -> Path:
        """The run's folder (a checkpoint file's parent)."""
        run = self.translator.run
        return run if run.is_dir() else run.parent

    def files(self) -> dict[str, Path]:
        """The run's pictures that exist: eval.png, loss.png."""
        return {name: self.folder / name for name in ("eval.png", "loss.png") if (self.folder / name).is_file()}

    def scores(self) -> Scores | None:
        """The run's n2n-eval table (its eval.json, every row as n2n-eval prints it), or None."""
        report = self.folder / "eval.json"
        return score_rows(json.loads(report.read_text())) if report.is_file() else None


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8, as n2n-translate's grid rounds."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def build(served: list[Served]):
    """The Gradio page: a tab per run."""
    try:
        import gradio as gr
    except ImportError as err:
        raise ServeError("n2n serve needs gradio: pip install 'n2n[serve]'") from err
    def guarded(fn):
        def call(*args):
            try:
                return fn(*args)
            except N2NError as err:
                raise gr.Error(str(err).strip().replace("\n", " ")) from None
        return call

    with gr.Blocks(title="n2n") as page:
        gr.Markdown("# n2n: network-to-network translation")
        for index, run in enumerate(served):
            with gr.Tab(run.name):
                gr.Markdown(run.about())
                modality = run.translator.source.modality
                with gr.Row():
                    start = run.sampling
                    n = gr.Slider(1, 16, value=min(start.n, 16) if modality == "text" else min(start.n, 4), step=1,
                                  label="samples", elem_id=f"n-{index}")
                    temperature = gr.Slider(0.0, 2.0, value=start.temperature, step=0.05,
                                            label="temperature (the scale of z)", elem_id=f"temperature-{index}")
                    seed = gr.Number(value=start.seed, precision=0, minimum=0, label="seed",
                                     elem_id=f"seed-{index}")
                if modality == "text":
                    source = gr.Textbox(label="caption", placeholder="a small red circle in the top left",
                                        elem_id=f"caption-{index}")
                else:
                    source = image_field(gr, "image", f"image-{index}")
                go = gr.Button("translate", variant="primary", elem_id=f"go-{index}")
                if run.translator.target.can_decode:
                    out = gr.Gallery(label="samples", columns=4, format="png", elem_id=f"gallery-{index}")
                    handler = guarded(lambda src, k, t, s, run=run, modality=modality: run.images(
                        [inputs(src, modality, run)], int(k), float(t), int(s)))
                else:
                    out = gr.Dataframe(headers=["sample", "rank", "cosine", "caption"], label="nearest captions",
                                       elem_id=f"captions-{index}", wrap=True)
                    handler = guarded(lambda src, k, t, s, run=run, modality=modality: run.captions(
                        [inputs(src, modality, run)], int(k), float(t), int(s)))
                go.click(handler, [source, n, temperature, seed], out, api_name=f"translate_{index}")
                if run.edits:
                    with gr.Accordion("edit an image: keep what its caption leaves open, change what it says",
                                      open=False):
                        picture = image_field(gr, "an image of the target's kind", f"edit-image-{index}")
                        with gr.Row():
                            old = gr.Textbox(label="its caption", elem_id=f"edit-from-{index}")
                            new = gr.Textbox(label="the new caption", elem_id=f"edit-to-{index}")
                        edit = gr.Button("edit", elem_id=f"edit-go-{index}")
                        after = gr.Gallery(label="its reconstruction, then the edit", columns=2, format="png",
                                           elem_id=f"edit-gallery-{index}")
                        edit.click(guarded(lambda img, a, b, run=run: run.edit(inputs(img, "image", run), a, b)),
                                   [picture, old, new], after, api_name=f"edit_{index}")
                with gr.Accordion("the run's scores and curves", open=False):
                    table = run.scores()
                    if table is not None:
                        gr.Dataframe(value=[list(row) for row in table.rows], headers=table.headers,
                                     interactive=False)
                        if table.caption:
                            gr.Markdown(table.caption)
                    for name, path in run.files().items():
                        gr.Image(value=str(path), label=name, interactive=False)
    return page


def inputs(value: object, modality: str, run: Served) -> object:
    """One input for the translator from a page's field, checked: a caption, or an uploaded image (a file's
    path, as the page's image fields hand it over, or a PIL image)."""
    if modality == "text":
        return run.check_caption(value)
    if isinstance(value, str | Path) and str(value):
        return read_upload(Path(value))
    if not isinstance(value, Image.Image):
        raise ServeError("upload an image first (a PNG or JPEG file)")
    return value.convert("RGB")


def read_upload(path: Path) -> Image.Image:
    """An uploaded file as an RGB image; one that is not an image, or whose size is a decompression bomb's
    (PIL's limit), is a ServeError in n2n's words."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ServeError(f"the upload is too large to open safely ({err}); upload a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ServeError("the upload is not an image n2n can read: upload a PNG or JPEG file") from None


def image_field(gr, label: str, elem_id: str):  # noqa: ANN001, ANN201 (gradio is imported where the page is built)
    """An upload field that hands the translator the file's path, so that n2n opens it (``read_upload``): an
    upload Gradio cannot open (not an image, a decompression bomb) is then n2n's one-line message on the page,
    not Gradio's "Could not preprocess input component"."""
    field = gr.Image(type="filepath", label=label, sources=["upload"], elem_id=elem_id)
    preprocess = field.preprocess

    def checked(payload):  # noqa: ANN001, ANN202
        try:
            return preprocess(payload)
        except Exception:  # Gradio opened it with PIL first: the file is not one n2n can use either
            message = "the upload is not an image n2n can read: upload a PNG or JPEG file"
            try:
                if getattr(payload, "path", None):
                    read_upload(Path(payload.path))
            except ServeError as err:  # what is wrong with it, in n2n's words
                message = str(err)
            raise gr.Error(message) from None

    field.preprocess = checked
    return field


@dataclass(frozen=True)
class ServeConfig:
    """Where ``n2n serve`` listens and runs; how it samples is ``SamplingConfig`` (the page's sliders start at
    its ``n``, ``temperature`` and ``seed``; ``steps`` and ``guidance`` hold for every request)."""

    host: str = setting("127.0.0.1", "Address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 serves the "
                                     "network.")
    port: int | None = setting(None, "Port. [default: Gradio's, 7860, or the next free one]", min=1, max=65535)
    device: str = setting("cpu", "Where the translators and experts run: cpu, cuda or cuda:N.")

    def __post_init__(self) -> None:
        check_fields(self)


def serve(runs: list[str] | None = None, host: str | None = None, port: int | None = None, device: str | None = None,
          block: bool = True, *, config: str | os.PathLike | None = None, **options: Any):
    """Load ``runs`` and serve their page; returns the Gradio app (``block=False`` for tests and notebooks).
    ``options``: ``ServeConfig``'s fields (``host``, ``port``, ``device``) and ``SamplingConfig``'s (``n``,
    ``temperature``, ``seed``, ``steps``, ``guidance``); ``config``: a YAML file of them (and ``run``), which
    keyword arguments override, as ``n2n serve --config`` reads it."""
    given = {"run": runs, "host": host, "port": port, "device": device, **options}
    mine, (where, sampling) = load_options(config, given, ServeConfig, SamplingConfig, own={"run": None})
    where, sampling = ServeConfig(**where), SamplingConfig(**sampling)  # each checked before any run is loaded
    runs = [mine["run"]] if isinstance(mine["run"], str | os.PathLike) else list(mine["run"] or [])
    if not runs:
        raise ServeError("no run to serve: give one or more --run")
    page = build([Served.load(run, where.device, sampling) for run in runs])
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=where.host, server_port=where.port, prevent_thread_lock=not block, show_error=True,
                quiet=True)
    return page


@click.command("serve", context_settings=CONTEXT)
@config_option
@click.option("--run", "run", multiple=True,
              help="A run folder, a saved translator's folder or its Hugging Face Hub id (repeatable: a tab each).")
@click_options(ServeConfig)
@click_options(SamplingConfig)
@reports_errors
def main(run: tuple[str, ...], **options: Any) -> None:
    """Try translators in a browser: a page with a tab per run. A text source: type a caption, get decoded
    samples; an image source: upload one, read the nearest captions of each sample. --n, --temperature and
    --seed set where the page's sliders start; --steps and --guidance hold for every request.

    Example: n2n serve --run runs/minilm_ae --run runs/ae_minilm"""
    serve(list(run), **options)
