"""n2n-train-classifier (the expert with known invariances) and n2n-diagnose, end to end at small scale.

The real code paths on tiny models: a classifier trained for a few steps, a one-block autoencoder and a
judge of 20 steps; what a correct diagnosis finds on the full-size ones is measured on the Benchmarks page.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import n2n
from n2n.diagnose.api import DiagnoseConfig, chance, kept_and_free
from n2n.diagnose.cli import main as diagnose_main
from n2n.errors import N2NError
from n2n.extract.experts import load_expert
from n2n.extract.experts.classifier import ConvClassifier, load_classifier
from n2n.extract.train_classifier import main as train_classifier_main

CLASSIFIER = ["--limit", 128, "--steps", 5, "--batch-size", 16, "--image-size", 32, "--channels", "4,8",
              "--grid", 2, "--device", "cpu"]


@pytest.fixture(scope="module")
def kit(tmp_path_factory, small_judge, invoke):
    """A classifier trained for 5 steps (32 px) and a one-block autoencoder (32 px, 8 dims)."""
    from n2n.extract.train_ae import ConvAutoencoder, save_autoencoder

    root = tmp_path_factory.mktemp("diagnose")
    result = invoke(train_classifier_main, *CLASSIFIER, "--out", root / "classifier-shapes")
    assert result.exit_code == 0, result.output
    torch.manual_seed(0)
    ae = save_autoencoder(ConvAutoencoder(image_size=32, channels=(4,), latent_dim=8), root / "ae-shapes")
    return {"root": root, "classifier": root / "classifier-shapes", "ae": ae, "judge": small_judge}


def small_diagnosis(kit, out, **options):
    settings = {"limit": 96, "steps": 12, "shards": kit["root"] / "shards", "out": out, "judge": kit["judge"],
                "inputs": 6, "samples": 3, "rows": 2, "shown": 2, "device": "cpu", "progress": False,
                "train_options": {"n_flows": 2, "hidden_dim": 16, "batch_size": 16, "eval_every": 6,
                                  "holdout": 0.2, "logger": "none"}}
    return n2n.diagnose(f"classifier:{kit['classifier']}", ["block1", "logits"], f"ae:{kit['ae']}", "shapes",
                        **{**settings, **options})


# ---------------------------------------------------------------- the classifier


def test_classifier_is_saved_with_a_report_and_a_rerun_skips(kit, invoke):
    report = json.loads((kit["classifier"] / "report.json").read_text())
    assert report["label"] == "shape" and report["classes"] == ["circle", "square", "triangle", "star", "cross"]
    assert 0 <= report["val_accuracy"] <= 1 and report["val_images"] == 2000
    assert report["layers"] == {"pool": 8, "block1": 16, "block2": 32, "logits": 5}
    again = invoke(train_classifier_main, *CLASSIFIER, "--out", kit["classifier"])
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_classifier_layers_come_from_one_pass_and_do_not_depend_on_the_batch(kit):
    expert = load_expert(f"classifier:{kit['classifier']}@block1")
    assert expert.layers[0] == "block1" and set(expert.layers) == {"pool", "block1", "block2", "logits"}
    assert expert.name == "classifier-shapes"  # not classifier-classifier-shapes
    images = [{"image": Image.new("RGB", (32, 32), color)} for color in ("red", "blue", "green")]
    batch = {k: v for k, v in expert.collate([expert.rows(item)[0] for item in images]).items()}
    together = expert.encode(batch, ["block1", "logits"])
    alone = expert.encode({"image": batch["image"][1:2]}, ["block1", "logits"])
    assert together["block1"].shape == (3, 16) and together["logits"].shape == (3, 5)
    for layer in ("block1", "logits"):
        torch.testing.assert_close(together[layer][1:2], alone[layer], rtol=1e-5, atol=1e-5)
    model = load_classifier(kit["classifier"])
    torch.testing.assert_close(model(batch["image"]), together["logits"])  # logits are the head's own output


@pytest.mark.parametrize(("args", "message"), [
    (["--label", "texture"], "--label texture: dataset shapes labels color, shape, size, position; pick one"),
    (["--data", "biggan"], "has no image or attributes"),
    (["--image-size", 8, "--channels", "4,8", "--grid", 4], "leaving at least --grid 4 px"),
])
def test_classifier_bad_input_is_one_line_and_writes_nothing(tmp_path, invoke, args, message):
    result = invoke(train_classifier_main, *args, "--out", tmp_path / "c")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_a_classifier_learns_to_name_the_shape():
    """A real fit on 1500 images: far above chance (20%) on images it has not seen."""
    from rich.progress import Progress

    from n2n.extract.train_classifier import TrainClassifierConfig, accuracy, fit, labelled_dataset, load_labelled

    cfg = TrainClassifierConfig(limit=1500, steps=200, device="cpu")
    train_set, classes = labelled_dataset(cfg, "train")
    val_set, _ = labelled_dataset(cfg, "val")
    torch.manual_seed(0)
    model = ConvClassifier("shape", classes)
    with Progress(disable=True) as progress:
        images, labels = load_labelled(train_set, "shape", classes, 64, 1500, progress)
        held, held_labels = load_labelled(val_set, "shape", classes, 64, 300, progress)
        fit(model, images, labels, cfg, progress)
    assert accuracy(model, held, held_labels) > 0.6


# ---------------------------------------------------------------- the diagnosis


def test_diagnosis_writes_its_figure_report_and_scores(kit, tmp_path):
    out = tmp_path / "diag"
    report = small_diagnosis(kit, out)
    assert list(report["layers"]) == ["block1", "logits", "reference"]
    saved = json.loads((out / "diagnosis.json").read_text())
    assert saved["layers"].keys() == report["layers"].keys() and saved["inputs"] == 6
    for layer, entry in report["layers"].items():
        assert (out / "runs" / layer / "checkpoint.safetensors").exists()
        assert np.isfinite(entry["heldout_bpd"]) and np.isfinite(entry["linear_gaussian_bpd"])
        assert set(entry["attributes"]) == {"color", "shape", "size", "position"}
        for scores in entry["attributes"].values():
            assert 0 <= scores["kept"] <= 1 and 0 <= scores["free"] <= 1.5
    assert report["layers"]["block1"]["dim"] == 16 and report["layers"]["logits"]["dim"] == 5
    assert report["layers"]["reference"]["dim"] == 8
    assert set(report["chance"]) == {"color", "shape", "size", "position"}
    figure = Image.open(out / "diagnosis.png")
    # the input, then 3 layers of 2 samples, each cell 64 px (32 px doubled), 2 rows under a header
    assert figure.width > 7 * 64 and figure.height > 2 * 64


def test_a_rerun_reuses_stores_and_runs_and_gives_the_same_report(kit, tmp_path):
    out = tmp_path / "diag"
    first = small_diagnosis(kit, out)
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoint.safetensors")}
    stores = {p: p.stat().st_mtime_ns for p in (kit["root"] / "shards" / "shapes").glob("*/meta.json")}
    second = small_diagnosis(kit, out)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoint.safetensors")} == checkpoints
    assert {p: p.stat().st_mtime_ns for p in (kit["root"] / "shards" / "shapes").glob("*/meta.json")} == stores
    assert second["layers"] == first["layers"]


def test_the_command_prints_each_layer_beside_chance(kit, tmp_path, invoke):
    out = tmp_path / "cli"
    result = invoke(diagnose_main, "--expert", f"classifier:{kit['classifier']}", "--layers", "block2,pool",
                    "--decoder", f"ae:{kit['ae']}", "--data", "shapes", "--limit", 96, "--steps", 6,
                    "--shards", kit["root"] / "shards", "--out", out, "--judge", kit["judge"], "--inputs", 4,
                    "--samples", 2, "--rows", 1, "--shown", 1, "--no-reference", "--device", "cpu",
                    "--train-option", "n_flows=2", "--train-option", "hidden_dim=16", "--train-option",
                    "batch_size=16", "--train-option", "holdout=0.2", "--train-option", "logger=none")
    assert result.exit_code == 0, result.output
    for text in ("block2", "pool", "chance", "color", "position", "kept / free", "diagnosis.png"):
        assert text in result.output
    assert json.loads((out / "diagnosis.json").read_text())["layers"].keys() == {"block2", "pool"}


@pytest.mark.parametrize(("change", "message"), [
    ({"layers": ["block1"]}, "give at least 2 layers"),
    ({"layers": ["block1", "block9"]}, "has no layer block9; its layers: pool, block1, block2, logits"),
    ({"layers": ["block1", "block1"]}, "names block1 more than once"),
    ({"decoder": "classifier"}, "cannot decode latents into images"),
    ({"expert": "classifier@pool"}, "without a layer"),
    ({"shown": 5}, "--shown 5 is more than --samples 3"),
    ({"samples": 1}, "samples"),
])
def test_bad_input_is_one_line_before_anything_is_written(kit, tmp_path, change, message):
    args = {"expert": f"classifier:{kit['classifier']}", "layers": ["block1", "logits"],
            "decoder": f"ae:{kit['ae']}", "data": "shapes"}
    if change.get("decoder") == "classifier":
        change = {"decoder": f"classifier:{kit['classifier']}"}
    if change.get("expert") == "classifier@pool":
        change = {"expert": f"classifier:{kit['classifier']}@pool"}
    options = {"shards": tmp_path / "shards", "out": tmp_path / "out", "samples": 3, "progress": False}
    options.update({k: v for k, v in change.items() if k not in args})
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(N2NError, match=message.replace("(", r"\(")) as err:
        n2n.diagnose(**args, **options)
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "shards") and not os.path.exists(tmp_path / "out")


def test_kept_free_and_chance_are_what_they_say():
    truth = [{"color": "red"}, {"color": "blue"}]
    values = {"color": ["red", "blue", "green"]}
    same = kept_and_free({"color": ["red"] * 4 + ["blue"] * 4}, truth, values, 4)["color"]
    assert same == {"kept": 1.0, "free": 0.0}
    mixed = kept_and_free({"color": ["red", "blue", "green", "red", "blue", "green", "red", "blue"]}, truth,
                          values, 4)["color"]
    assert mixed["kept"] == pytest.approx(4 / 8) and mixed["free"] > 0.8
    assert chance(truth, ["color"]) == {"color": 0.5}
    assert chance([{"color": "red"}] * 3, ["color"]) == {"color": 1.0}


def test_the_config_checks_the_api_too():
    with pytest.raises(N2NError, match="--inputs"):
        DiagnoseConfig(expert="x", layers=["a", "b"], decoder="y", data="shapes", inputs=0)


def test_an_out_holding_something_else_is_refused_without_overwrite(tmp_path, invoke):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke(train_classifier_main, *CLASSIFIER, "--out", out)
    assert result.exit_code == 2 and "holds no loadable classifier" in result.output and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
