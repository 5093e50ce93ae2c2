"""Translators on the Hugging Face Hub: save_pretrained -> from_pretrained samples the same bits; a Hub id
resolves offline from the local cache; push_to_hub uploads the folder (huggingface_hub's network calls are
replaced here: no test reaches the Hub); n2n-translate and n2n-eval take a saved translator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import n2n
from n2n.evaluate.cli import main as n2n_eval
from n2n.shards import write_json_atomic
from n2n.shards.view import open_view
from n2n.translate.cli import main as n2n_translate

TINY = {"n_flows": 2, "hidden_dim": 16, "batch_size": 32, "compile": False, "progress": False, "holdout": 0.2,
        "logger": "none"}


@pytest.fixture(scope="module")
def run(ae_view, tmp_path_factory) -> Path:
    """A scored run: its eval.json feeds the model card."""
    folder = n2n.train(ae_view, tmp_path_factory.mktemp("hub") / "run", steps=20, **TINY)
    write_json_atomic(folder / "eval.json", n2n.evaluate(folder, samples=2, baseline_steps=5, progress=False))
    return folder


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def test_save_pretrained_writes_the_hub_layout_and_loads_to_the_same_samples(run, picture, tmp_path):
    translator = n2n.Translator.load(run)
    saved = translator.save_pretrained(tmp_path / "saved", license="apache-2.0")
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["n2n_pretrained"] == 1 and config["model"]["dim"] == 8
    assert config["source"]["expert"]["spec"].startswith("ae:") and "digest" in config["target"]["expert"]
    card = (saved / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: n2n\nlicense: apache-2.0\n")
    assert "## Scores" in card and "median rank, one sample" in card and "Translator.from_pretrained" in card
    assert "| metric | translator | linear LS | MLP |" in card and "a coupling translator of" in card
    with pytest.warns(DeprecationWarning, match="Translator.trained"):
        assert translator.flow is translator.trained  # the old name of the trained flow
    again = n2n.Translator.from_pretrained(saved)
    a, b = (t.translate([picture], n=3, seed=0) for t in (translator, again))
    assert torch.equal(a, b)


def test_a_hub_id_resolves_offline_from_the_cache(run, picture, tmp_path, monkeypatch):
    """The Hub cache's layout (models--owner--name/snapshots/<commit>, refs/main), as snapshot_download leaves
    it; with HF_HUB_OFFLINE=1 the id is found there and nothing is fetched."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    repo = cache / "models--someone--tiny-ae-to-ae"
    commit = "0123456789abcdef0123456789abcdef01234567"
    n2n.Translator.load(run).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = n2n.Translator.from_pretrained("someone/tiny-ae-to-ae", cache_dir=cache)
    assert torch.equal(loaded.translate([picture], n=2, seed=1), n2n.Translator.load(run).translate([picture], n=2,
                                                                                                     seed=1))
    with pytest.raises(n2n.N2NError, match=r"someone/missing: no run folder there, and no translator of that id"):
        n2n.Translator.from_pretrained("someone/missing", cache_dir=cache)


def test_push_to_hub_creates_the_repo_and_uploads_the_saved_folder(run, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message="",
                                          commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = n2n.Translator.load(run).push_to_hub("someone/tiny", private=True)
    assert url == "https://huggingface.co/someone/tiny/commit/abc"
    assert calls["create"] == ("someone/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert 'Translator.from_pretrained("someone/tiny")' in calls["card"]
    with pytest.raises(n2n.N2NError, match="repo_id 'no slash'"):
        n2n.Translator.load(run).push_to_hub("no slash")


def test_n2n_translate_draws_the_same_grid_from_a_saved_translator(run, picture, tmp_path, invoke):
    saved = n2n.Translator.load(run).save_pretrained(tmp_path / "saved")
    grids = []
    for source in (run, saved):
        out = tmp_path / f"grid-{source.name}.png"
        result = invoke(n2n_translate, "--run", source, "--input", picture, "-n", 2, "--out", out)
        assert result.exit_code == 0, result.output
        grids.append(np.asarray(Image.open(out)))
    assert np.array_equal(*grids)


def test_n2n_eval_scores_a_saved_translator_on_a_view_of_its_experts(run, ae_view, tmp_path, invoke):
    saved = n2n.Translator.load(run).save_pretrained(tmp_path / "saved")
    report = n2n.evaluate(saved, shards=ae_view, samples=2, baseline_steps=5, progress=False)
    own = json.loads((run / "eval.json").read_text())
    assert report["heldout_bpd"] == pytest.approx(own["heldout_bpd"], abs=1e-6)
    assert report["translation"]["translator"] == own["translation"]["translator"]
    with pytest.raises(n2n.N2NError, match="records no view"):
        n2n.evaluate(saved, samples=2, progress=False)
    result = invoke(n2n_eval, "--run", saved, "--shards", ae_view, "--samples", 2, "--baseline-steps", 5,
                    "--out", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["heldout_bpd"] == pytest.approx(own["heldout_bpd"])


def test_a_view_of_other_experts_is_refused_naming_both(run, ae_view, tmp_path):
    saved = n2n.Translator.load(run).save_pretrained(tmp_path / "saved")
    stores = open_view(ae_view)
    swapped = n2n.pair(stores.target, stores.source, name="swapped", root=tmp_path)  # the same sizes, 8 -> 8
    with pytest.raises(n2n.N2NError, match=r"pairs ae:.* -> ae:.*, the translator translates ae:.* -> ae:"):
        n2n.evaluate(saved, shards=swapped.path, samples=2, progress=False)
