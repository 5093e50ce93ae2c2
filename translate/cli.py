"""n2n-translate: sample a trained translator for some inputs; write an image grid or the latents."""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np
from PIL import Image

from n2n.cli import CONTEXT, console, reports_errors
from n2n.options import click_options, config_option
from n2n.shards import write_json_atomic
from n2n.train.checkpoint import CHECKPOINTS
from n2n.translate.grid import image_grid
from n2n.translate.pipeline import SamplingConfig, TranslateError, Translator


def read_inputs(texts: tuple[str, ...], text_file: Path | None, images: tuple[Path, ...]) -> tuple[list, list[str]]:
    """The inputs to translate (captions, then image files) and a label for each."""
    if text_file is not None:
        lines = [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines()]
        if not any(lines):
            raise TranslateError(f"--text-file {text_file} holds no text; write one caption per line")
        texts = (*texts, *(line for line in lines if line))
    if any(not t.strip() for t in texts):
        raise TranslateError("an empty --text; give the caption to translate, e.g. --text 'a red circle'")
    if not texts and not images:
        raise TranslateError("nothing to translate: give --text, --text-file or --input IMAGE")
    return [*texts, *images], [*texts, *(p.name for p in images)]


def write_atomic_image(image: Image.Image, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    image.save(tmp)
    os.replace(tmp, out)


def write_atomic_npy(array: np.ndarray, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, out)


@click.command(context_settings=CONTEXT)
@config_option
@click.option("--run", "run", required=True, type=click.Path(path_type=Path),
              help="Run folder of n2n-train, or a saved translator (its folder or Hugging Face Hub id).")
@click.option("--text", "texts", multiple=True, help="A caption to translate (repeatable).")
@click.option("--text-file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Captions to translate, one per line.")
@click.option("--input", "images", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="An image to translate, for runs whose source expert reads images (repeatable).")
@click_options(SamplingConfig)
@click.option("--out", type=click.Path(path_type=Path), default=Path("grid.png"),
              help="A .png grid (one row per input, its text underneath) or a .npy of latents [inputs, n, dim].")
@click.option("--source-weights", type=click.Path(path_type=Path), default=None,
              help="Local weights of the source expert, when they are not where its store says.")
@click.option("--target-weights", type=click.Path(path_type=Path), default=None,
              help="Local weights of the target expert, when they are not where its store says.")
@click.option("--checkpoint", type=click.Choice(CHECKPOINTS), default="best", show_default=True,
              help="Which weights of a run folder: best (its best held-out NLL; the last where it has none) or "
                   "last (what --resume continues).")
@reports_errors
def main(run: Path, texts: tuple[str, ...], text_file: Path | None, images: tuple[Path, ...], n: int,
         temperature: float, seed: int, steps: int | None, guidance: float, out: Path, source_weights: Path | None,
         target_weights: Path | None, checkpoint: str) -> None:
    """Translate inputs with a trained run: encode with the source expert, sample the cINN n times,
    decode with the target expert.

    Example: n2n-translate --run runs/minilm_ae --text "a small red circle in the top left" -n 8 --out grid.png
    """
    SamplingConfig(n, temperature, seed, steps, guidance)  # each checked, before the experts load
    if out.suffix not in (".png", ".npy"):
        raise TranslateError(f"--out {out}: write a .png grid or a .npy of latents")
    import transformers  # here: it takes a second to import, and a bad option needs none of it

    transformers.logging.disable_progress_bar()
    inputs, labels = read_inputs(texts, text_file, images)
    translator = Translator.load(run, source_weights=source_weights, target_weights=target_weights,
                                 console=console(), checkpoint=checkpoint)
    latents = translator.sample(inputs, n, temperature, seed, steps, guidance)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        write_atomic_npy(latents.numpy(), out)
        write_json_atomic(out.with_suffix(".json"), {"inputs": labels, "n": n, "temperature": temperature,
                                                     "seed": seed, "steps": steps, "guidance": guidance,
                                                     "run": str(run)})
    else:
        write_atomic_image(image_grid(translator.decode(latents), labels), out)
    console().print(f"wrote {out} ({len(inputs)} inputs x {n} samples)")
