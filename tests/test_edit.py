"""Editing through the residual: v = f(x | c) of a target under its source, recombined as f^-1(v | c') under
another. The round trip gives the target back (exactly for a coupling translator, to the ODE solver's error
for a continuous one), on small runs of both kinds made here; the command draws and writes edits; bad input
is one line that leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import n2n
from n2n.extract.datasets import open_dataset
from n2n.extract.experts.ae import ConvAutoencoder, save_autoencoder
from n2n.translate.cli import main as n2n_translate

COUPLING_TOLERANCE = 1e-5  # relative to the targets' norm: float rounding of an exact inverse
CONTINUOUS_TOLERANCE = 1e-3  # relative, at the run's own ODE steps (heun); it shrinks with --steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """MiniLM -> autoencoder as both kinds, autoencoder -> MiniLM (a target that does not decode), 60 shapes."""
    root = tmp_path_factory.mktemp("edit")
    torch.manual_seed(0)
    ae = save_autoencoder(ConvAutoencoder(image_size=32, channels=(8,), latent_dim=8), root / "ae")
    common = {"out": root / "shards", "limit": 60, "num_workers": 0, "data_options": {"size": 32}, "progress": False}
    text, image = n2n.extract("minilm", "shapes", **common), n2n.extract(f"ae:{ae}", "shapes", **common)
    tiny = {"steps": 30, "batch_size": 32, "holdout": 0.2, "compile": False, "progress": False, "logger": "none"}
    forward, backward = n2n.pair(text, image, name="text_image"), n2n.pair(image, text, name="image_text")
    return {"coupling": n2n.train(forward, root / "runs" / "coupling", n_flows=2, hidden_dim=16, **tiny),
            "continuous": n2n.train(forward, root / "runs" / "continuous", translator="continuous",
                                    velocity_width=32, **tiny),
            "image_text": n2n.train(backward, root / "runs" / "image_text", n_flows=2, hidden_dim=16, **tiny)}


@pytest.fixture(scope="module")
def shapes() -> list[dict]:
    dataset = open_dataset("shapes", size=32)
    return [dataset[i] for i in range(40, 44)]


@pytest.mark.parametrize("kind, tolerance", [("coupling", COUPLING_TOLERANCE), ("continuous", CONTINUOUS_TOLERANCE)])
def test_recombining_a_residual_under_its_own_source_gives_the_target_back(runs, shapes, kind, tolerance):
    translator = n2n.Translator.load(runs[kind])
    images, captions = [item["image"] for item in shapes], [item["text"][0] for item in shapes]
    x = translator.encode(images, "target")
    v = translator.residual(images, captions)
    assert v.shape == x.shape and torch.isfinite(v).all()
    back = translator.recombine(v, captions)
    assert back.shape == (4, 4, x.shape[1])
    diagonal = back[range(4), range(4)]
    assert float((diagonal - x).norm() / x.norm()) < tolerance
    assert float((back[0, 1] - x[0]).norm()) > 10 * float((diagonal[0] - x[0]).norm())  # another caption moves it


def test_edit_draws_each_target_under_each_new_source(runs, shapes):
    translator = n2n.Translator.load(runs["coupling"])
    images = translator.edit([shapes[0]["image"]], [shapes[0]["text"][0]], ["a red circle", "a blue square"])
    assert images.shape == (1, 2, 3, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1
    latents = translator.edit([shapes[0]["image"]], [shapes[0]["text"][0]], ["a red circle"], decode=False)
    assert latents.shape == (1, 1, 8)


def test_the_command_writes_the_original_its_reconstruction_and_each_edit(runs, shapes, tmp_path, invoke):
    picture = tmp_path / "target.png"
    shapes[0]["image"].save(picture)
    args = ["--run", runs["coupling"], "--edit", picture, "--from", shapes[0]["text"][0], "--text", "a red circle",
            "--text", "a blue square"]
    result = invoke(n2n_translate, *args, "--out", tmp_path / "edit.png")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "edit.png") as grid:
        assert grid.width >= 4 * 64  # original, reconstruction and two edits, enlarged x2
    result = invoke(n2n_translate, *args, "--out", tmp_path / "edit.npy")
    assert result.exit_code == 0, result.output
    latents = np.load(tmp_path / "edit.npy", allow_pickle=False)
    translator = n2n.Translator.load(runs["coupling"])
    x = translator.encode([picture], "target")
    assert latents.shape == (1, 3, 8) and np.allclose(latents[0, 0], x[0].numpy(), atol=1e-4)  # the reconstruction
    assert json.loads((tmp_path / "edit.json").read_text())["columns"] == ["reconstruction", "a red circle",
                                                                          "a blue square"]


def test_bad_edits_are_one_line_and_leave_nothing_behind(runs, shapes, tmp_path, invoke):
    translator = n2n.Translator.load(runs["coupling"])
    caption = shapes[0]["text"][0]
    with pytest.raises(n2n.N2NError, match=r"residuals of shape \(2, 5\): this run's residuals are \[N, 8\]"):
        translator.recombine(torch.zeros(2, 5), [caption])
    with pytest.raises(n2n.N2NError, match="the run's target expert .* reads image"):
        translator.residual([42], [caption])
    with pytest.raises(n2n.N2NError, match="input missing.png is not a readable image"):
        translator.residual(["missing.png"], [caption])
    with pytest.raises(n2n.N2NError, match=r"steps \(--steps\) = 0"):
        translator.residual([shapes[0]["image"]], [caption], steps=0)
    with pytest.raises(n2n.N2NError, match="2 targets and 1 sources"):
        translator.residual([shapes[0]["image"], shapes[1]["image"]], [caption])
    picture = tmp_path / "target.png"
    shapes[0]["image"].save(picture)
    cases = [(runs["image_text"], ["--edit", caption, "--from", picture, "--input", picture], "edit.png",
              "has no decoder, so edits cannot be drawn"),
             (runs["coupling"], ["--edit", tmp_path / "missing.png", "--from", caption, "--text", "a red circle"],
              "edit.png", "no such image file"),
             (runs["coupling"], ["--from", caption, "--text", "a red circle"], "edit.png",
              "give the target with --edit"),
             (runs["coupling"], ["--edit", picture, "--edit", picture, "--from", caption, "--from", caption,
                                 "--from", caption, "--text", "a red"], "edit.png", "2 --edit and 3 --from")]
    for run, args, name, message in cases:
        result = invoke(n2n_translate, "--run", run, *args, "--out", tmp_path / "out" / name)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "out" / name).exists()
