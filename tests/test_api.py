"""The README's Python API snippet, run as written, and what its names promise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import n2n
from n2n.extract.experts.ae import ConvAutoencoder, save_autoencoder

REPO = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    """The first python block of the README's "Python API" section."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch, small_judge):
    torch.manual_seed(0)
    save_autoencoder(ConvAutoencoder(image_size=64, channels=(8, 16), latent_dim=16), tmp_path / "experts/ae-shapes")
    shutil.copytree(small_judge, tmp_path / "experts/judge-shapes")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), scope)
    src, dst, view, run = scope["src"], scope["dst"], scope["view"], scope["run"]
    assert isinstance(src, n2n.Store) and src.complete and src.dim == 384 and len(src) == 5 * 200
    assert isinstance(view, n2n.View) and (view.source.path, view.target.path) == (src.path, dst.path)
    assert view.path == Path("shards/minilm_ae") and Path(run) == Path("runs/minilm_ae")
    assert (Path(run) / "checkpoint.safetensors").is_file()
    assert scope["latents"].shape == (1, 8, dst.dim)
    images = scope["images"]
    assert images.shape == (1, 8, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    scores = scope["scores"]
    assert scores["heldout_bpd"] > 0 and "translator" in scores  # shapes scores its own translations
    assert sorted(p.name for p in Path("minilm-to-ae").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert isinstance(scope["t"], n2n.Translator)


def test_rerunning_returns_the_finished_store_without_work(tmp_path):
    first = n2n.extract("minilm", "shapes", limit=8, num_workers=0, out=tmp_path, progress=False)
    again = n2n.extract("minilm", "shapes", limit=8, num_workers=0, out=tmp_path, progress=False)
    assert again.path == first.path and len(again) == len(first) == 40


@pytest.mark.parametrize(("call", "message"), [
    (lambda: n2n.extract("minilm", "shapes", batch_size=0), "batch_size (--batch-size) = 0: must be an integer >= 1"),
    (lambda: n2n.extract("minilm", "shapes", limit=-5), "limit (--limit) = -5"),
    (lambda: n2n.extract("minilm", "shapes", bach_size=4), "unknown option 'bach_size'"),
    (lambda: n2n.extract("minilm", "shapes", dtype="float64"), "must be one of float16, float32"),
    (lambda: n2n.pair("nowhere/a", "nowhere/b"), "nowhere/a"),
])
def test_api_errors_are_n2n_errors_naming_the_input(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(n2n.N2NError, match=re.escape(message)):
        call()
    assert list(tmp_path.iterdir()) == []


def test_import_n2n_from_anywhere_finds_one_package(tmp_path):
    """From the checkout and from elsewhere, ``import n2n`` is the installed package, and no stage
    folder is importable under its own top-level name as a second copy."""
    code = ("import sys, n2n, n2n.cinn, n2n.shards, n2n.train.trainer, n2n.translate.pipeline; "
            "print(n2n.__file__); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('cinn', 'shards', 'train', 'extract', 'translate', 'parallel')))")
    for cwd in (REPO, tmp_path):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
        file, stray = out.stdout.splitlines()
        assert Path(file) == REPO / "__init__.py" and stray == "[]"


def test_the_wheel_holds_one_top_level_package(tmp_path):
    """``pip wheel .`` ships n2n alone (no cinn/, shards/, ... beside it in site-packages), and the
    installed copy works from outside the checkout with its stage packages and commands' modules."""
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):  # the files a clean clone has: no build/ left over from another build
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("n2n-*.whl")
    with zipfile.ZipFile(wheel) as z:
        top = {name.split("/")[0] for name in z.namelist()}
        entry_points = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    assert top == {"n2n", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "[n2n.experts]" in entry_points and "n2n-train = n2n.train.cli:main" in entry_points
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = "import n2n, n2n.train.cli, n2n.extract.cli, n2n.shards.cli; print(n2n.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert Path(out.stdout.strip()) == site / "n2n" / "__init__.py"


def test_a_project_folder_moved_after_training_still_translates_from_anywhere(tmp_path, monkeypatch):
    """shards/, runs/ and experts/ moved together: the run finds its view, the view its stores, and
    the autoencoder expert (named by a path relative to where extraction ran) its weights."""
    project, other = tmp_path / "project", tmp_path / "elsewhere"
    torch.manual_seed(0)
    save_autoencoder(ConvAutoencoder(image_size=64, channels=(8, 16), latent_dim=16), project / "experts/ae-shapes")
    other.mkdir()
    monkeypatch.chdir(project)
    common = {"limit": 24, "num_workers": 0, "progress": False}
    view = n2n.pair(n2n.extract("minilm", "shapes", **common), n2n.extract("ae:experts/ae-shapes", "shapes", **common))
    run = n2n.train(view, out="runs/t2i", steps=4, eval_every=4, n_flows=1, hidden_dim=8, progress=False)
    before = n2n.Translator.load(run).sample(["a red circle"], n=2, seed=3)

    moved = tmp_path / "moved"
    shutil.move(project, moved)
    monkeypatch.chdir(other)
    t = n2n.Translator.load(moved / run)
    assert torch.equal(t.sample(["a red circle"], n=2, seed=3), before)
    assert t.translate(["a red circle"], n=2).shape == (1, 2, 3, 64, 64)
