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
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from n2n.cli import CONTEXT, reports_errors
from n2n.errors import N2NError
from n2n.options import check_value
from n2n.shards import Store, open_store
from n2n.translate.pipeline import SamplingConfig, Translator, run_stores

CAPTION_BANK = 50_000  # target-store rows a caption is looked for among (the first ones)
NEAREST = 3  # captions shown per sample


class ServeError(N2NError):
    """A run that cannot be served, or Gradio missing; the message names it and the fix."""


@dataclass
class Served:
    """One run on the page: its translator, where it lives, and the target captions' bank (text targets)."""

    name: str
    translator: Translator
    store: Store | None = None  # the target store, where the run's view is at hand
    bank: torch.Tensor | None = None  # its first rows, L2-normalised, for nearest captions

    @classmethod
    def load(cls, run: str, device: str) -> Served:
        translator = Translator.load(run, device=device)
        served = cls(Path(str(run).rstrip("/")).name or str(run), translator)
        if translator.target.modality == "text":
            target = run_stores(translator.flow.meta, translator.run)[1]
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

    def images(self, inputs: list, n: int, temperature: float, seed: int) -> list[Image.Image]:
        """The decoded samples as PIL images, row-major (input, sample)."""
        decoded = self.translator.translate(inputs, n=n, temperature=temperature, seed=seed)
        flat = decoded.reshape(-1, *decoded.shape[-3:])
        return [Image.fromarray(to_uint8(image)) for image in flat]

    def captions(self, inputs: list, n: int, temperature: float, seed: int) -> list[list]:
        """For each sample, the ``NEAREST`` target-store captions with their cosine: rows of a table."""
        if self.bank is None:
            raise ServeError(f"{self.name}: its view's stores are not here, so there are no captions to show: "
                             "serve the run folder beside its shards/")
        from n2n.translate.texts import read_captions

        latents = self.translator.sample(inputs, n=n, temperature=temperature, seed=seed).flatten(0, 1)
        cosine = F.normalize(latents.float(), dim=1) @ self.bank.T
        best = cosine.topk(min(NEAREST, len(self.bank)), dim=1)
        rows = np.unique(best.indices.numpy())
        text = dict(zip(rows.tolist(), read_captions(self.store, rows), strict=True))
        return [[i + 1, rank + 1, round(float(c), 3), text[int(r)]]
                for i, (idx, cos) in enumerate(zip(best.indices, best.values, strict=True))
                for rank, (r, c) in enumerate(zip(idx, cos, strict=True))]

    def about(self) -> str:
        """What the run is, as Markdown."""
        meta = self.translator.flow.meta
        source, target = (meta[side].get("expert") or {} for side in ("source", "target"))
        parameters = sum(p.numel() for p in self.translator.flow.flow.parameters())
        nll, floor = meta.get("heldout_bpd"), meta.get("linear_gaussian_bpd")
        lines = [f"**{self.name}**: `{source.get('spec')}` → `{target.get('spec')}`, "
                 f"a {meta['model'].get('translator', 'coupling')} translator of {parameters:,} parameters at step "
                 f"{meta.get('step')}, from `{self.translator.run}`."]
        if nll is not None:
            lines.append(f"Held-out NLL {nll:.3f} bits/dim" + (f" (the linear-Gaussian floor: {floor:.3f})." if floor
                                                               is not None else "."))
        return "\n\n".join(lines)

    @property
    def folder(self) -> Path:
        """The run's folder (a checkpoint file's parent)."""
        run = self.translator.run
        return run if run.is_dir() else run.parent

    def files(self) -> dict[str, Path]:
        """The run's pictures that exist: eval.png, loss.png."""
        return {name: self.folder / name for name in ("eval.png", "loss.png") if (self.folder / name).is_file()}

    def scores(self) -> list[list[str]] | None:
        """The run's n2n-eval table (its eval.json), or None."""
        report = self.folder / "eval.json"
        if not report.is_file():
            return None
        from n2n.translate.evaluate import dataset_table
        from n2n.translate.report import report_rows

        data = json.loads(report.read_text())
        return [list(row) for row in report_rows(data, dataset_table(data))]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8, as n2n-translate's grid rounds."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def build(served: list[Served]):
    """The Gradio page: a tab per run."""
    try:
        import gradio as gr
    except ImportError as err:
        raise ServeError("n2n serve needs gradio: pip install 'n2n[serve]'") from err
    from n2n.translate.evaluate import TRANSLATORS

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
                    n = gr.Slider(1, 16, value=SamplingConfig.n if modality == "text" else 4, step=1,
                                  label="samples", elem_id=f"n-{index}")
                    temperature = gr.Slider(0.0, 2.0, value=SamplingConfig.temperature, step=0.05,
                                            label="temperature (the scale of z)", elem_id=f"temperature-{index}")
                    seed = gr.Number(value=SamplingConfig.seed, precision=0, minimum=0, label="seed",
                                     elem_id=f"seed-{index}")
                if modality == "text":
                    source = gr.Textbox(label="caption", placeholder="a small red circle in the top left",
                                        elem_id=f"caption-{index}")
                else:
                    source = gr.Image(type="pil", label="image", sources=["upload"], elem_id=f"image-{index}")
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
                with gr.Accordion("the run's scores and curves", open=False):
                    table = run.scores()
                    if table is not None:
                        headers = ["metric", *TRANSLATORS.values()][: len(table[0])]
                        gr.Dataframe(value=table, headers=headers, interactive=False)
                    for name, path in run.files().items():
                        gr.Image(value=str(path), label=name, interactive=False)
    return page


def inputs(value: object, modality: str, run: Served) -> object:
    """One input for the translator from a page's field, checked."""
    if modality == "text":
        return run.check_caption(value)
    if not isinstance(value, Image.Image):
        raise ServeError("upload an image first (a PNG or JPEG file)")
    return value.convert("RGB")


def serve(runs: list[str], host: str = "127.0.0.1", port: int | None = None, device: str = "cpu",
          block: bool = True):
    """Load ``runs`` and serve their page; returns the Gradio app (``block=False`` for tests and notebooks)."""
    if not runs:
        raise ServeError("no run to serve: give one or more --run")
    if port is not None:
        check_value("port", port, integer=True, min=1, max=65535)
    page = build([Served.load(run, device) for run in runs])
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=True)
    return page


@click.group(context_settings=CONTEXT)
def cli() -> None:
    """n2n's umbrella command: ``n2n serve`` (the others are n2n-extract, n2n-train, n2n-translate, ...)."""


@cli.command("serve", context_settings=CONTEXT)
@click.option("--run", "runs", multiple=True, required=True,
              help="A run folder, a saved translator's folder or its Hugging Face Hub id (repeatable: a tab each).")
@click.option("--host", default="127.0.0.1", help="Address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 "
                                                  "serves the network.")
@click.option("--port", type=int, default=None, help="Port (default: Gradio's, 7860, or the next free one).")
@click.option("--device", default="cpu", help="Where the translators and experts run: cpu, cuda or cuda:N.")
@reports_errors
def serve_command(runs: tuple[str, ...], host: str, port: int | None, device: str) -> None:
    """Try translators in a browser: a page with a tab per run. A text source: type a caption, get decoded
    samples; an image source: upload one, read the nearest captions of each sample.

    Example: n2n serve --run runs/minilm_ae --run runs/ae_minilm"""
    serve(list(runs), host, port, device)
