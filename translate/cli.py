"""n2n-translate: sample a trained translator for some inputs; write an image grid or the latents."""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

from n2n.cli import CONTEXT, console, reports_errors
from n2n.options import click_options, config_option
from n2n.shards import write_json_atomic
from n2n.train.checkpoint import CHECKPOINTS
from n2n.translate.grid import image_grid
from n2n.translate.pipeline import SamplingConfig, TranslateError, Translator, read_image


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
@click.option("--edit", "edits", multiple=True,
              help="Edit instead of sample: a target to keep the residual of (an image file for an image target, "
                   "a caption for a text one; repeatable). Each is drawn under every --text/--input, after the "
                   "original and its reconstruction.")
@click.option("--from", "sources_from", multiple=True,
              help="The source each --edit target was made from (its caption), one per --edit or one for all.")
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
def main(run: Path, texts: tuple[str, ...], text_file: Path | None, images: tuple[Path, ...],
         edits: tuple[str, ...], sources_from: tuple[str, ...], n: int, temperature: float, seed: int,
         steps: int | None, guidance: float, out: Path, source_weights: Path | None, target_weights: Path | None,
         checkpoint: str) -> None:
    """Translate inputs with a trained run: encode with the source expert, sample the translator n times,
    decode with the target expert. With --edit, keep each target's residual (what its --from source leaves
    open) and draw it under every new source instead.

    Example: n2n-translate --run runs/minilm_ae --text "a small red circle in the top left" -n 8 --out grid.png

    Edit: n2n-translate --run runs/minilm_ae --edit circle.png --from "a small red circle in the top left"
    --text "a small blue circle in the top left" --text "a small red square in the top left" --out edit.png
    """
    SamplingConfig(n, temperature, seed, steps, guidance)  # each checked, before the experts load
    if out.suffix not in (".png", ".npy"):
        raise TranslateError(f"--out {out}: write a .png grid or a .npy of latents")
    if sources_from and not edits:
        raise TranslateError("--from names the source of an --edit target: give the target with --edit")
    if edits and len(sources_from) not in (1, len(edits)):
        raise TranslateError(f"{len(edits)} --edit and {len(sources_from)} --from: give each target's source, or "
                             "one --from for all")
    import transformers  # here: it takes a second to import, and a bad option needs none of it

    transformers.logging.disable_progress_bar()
    inputs, labels = read_inputs(texts, text_file, images)
    translator = Translator.load(run, source_weights=source_weights, target_weights=target_weights,
                                 console=console(), checkpoint=checkpoint)
    if edits:
        write_edits(translator, list(edits), list(sources_from) * (len(edits) // len(sources_from)), inputs, labels,
                    steps, guidance, out)
        return
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


def write_edits(translator: Translator, edits: list[str], sources_from: list[str], inputs: list, labels: list[str],
                steps: int | None, guidance: float, out: Path) -> None:
    """``--edit``: per target, its reconstruction (its residual under its own source) and its residual under
    each new source, as a .npy of latents [targets, 1 + sources, dim] or a grid whose rows start with the
    original."""
    if out.suffix == ".png" and not translator.target.can_decode:
        raise TranslateError(f"--edit --out {out}: the target expert {translator.target.spec} has no decoder, so "
                             "edits cannot be drawn; write their latents (--out edit.npy)")
    image_target = translator.target.modality == "image"
    targets = [Path(edit) for edit in edits] if image_target else edits
    for target in targets:
        if image_target and not target.is_file():
            raise TranslateError(f"--edit {target}: no such image file; give the image to edit")
    sources = [Path(s) if translator.source.modality == "image" else s for s in sources_from]
    v = translator.residual(targets, sources, steps)
    rows = len(v)
    reconstruction = translator.recombine(v, sources, steps, guidance)[range(rows), range(rows)]
    latents = torch.cat([reconstruction[:, None], translator.recombine(v, inputs, steps, guidance)], dim=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        write_atomic_npy(latents.numpy(), out)
        write_json_atomic(out.with_suffix(".json"), {"edit": edits, "from": sources_from, "inputs": labels,
                                                     "columns": ["reconstruction", *labels], "steps": steps,
                                                     "guidance": guidance, "run": str(translator.run)})
    else:
        decoded = translator.decode(latents)
        originals = torch.stack([as_tensor(read_image(path), decoded.shape[-2:]) for path in targets]) \
            if image_target else torch.ones_like(decoded[:, 0])
        grid = torch.cat([originals[:, None], decoded], dim=1)
        row_labels = [f"{edit} ({source}): original, reconstruction, then " + " | ".join(labels)
                      for edit, source in zip(edits, sources_from, strict=True)]
        write_atomic_image(image_grid(grid, row_labels), out)
    console().print(f"wrote {out} ({rows} targets x {len(inputs)} new sources)")


def as_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An image as [3, H, W] in [0, 1] at the decoder's ``size`` (H, W), to stand beside decoded ones."""
    resized = image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)
