"""n2n-train-ae and the shapes judge: the real code paths at small scale; full quality under -m slow."""

import json

import pytest
import torch

from n2n.errors import N2NError
from n2n.extract.datasets.shapes import COLORS, POSITIONS, SHAPES, SIZES
from n2n.extract.datasets.shapes_judge import (
    ShapesJudge,
    accuracy,
    augment,
    load_judge,
    shapes_images,
    train_judge,
)
from n2n.extract.experts import load_expert
from n2n.extract.train_ae import TrainAEConfig

SMALL = ["--data", "shapes", "--limit", 256, "--steps", 30, "--batch-size", 16, "--latent-dim", 16,
         "--channels", "8,8,16,16", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_judge, n2n_train_ae):
    out = tmp_path_factory.mktemp("ae") / "ae-shapes"
    result = n2n_train_ae(*SMALL, "--out", out, "--judge", small_judge)
    assert result.exit_code == 0, result.output
    return out, result


def test_cli_saves_an_ae_expert_that_encodes_and_decodes(trained):
    out, result = trained
    assert "n2n-train-ae" in result.output and "judge on reconstructed val" in result.output
    expert = load_expert(f"ae:{out}")
    images, _ = shapes_images("val", 4)
    batch = expert.collate([row for i in range(4) for row in expert.rows({"image": _pil(images[i])})])
    latent = expert.encode(batch)["latent"]
    assert latent.shape == (4, 16) and torch.isfinite(latent).all()
    decoded = expert.decode(latent)
    assert decoded.shape == (4, 3, 64, 64) and decoded.min() >= 0 and decoded.max() <= 1


def test_report_has_steps_time_loss_and_judge_scores(trained):
    report = json.loads((trained[0] / "report.json").read_text())
    assert report["steps"] == 30 and report["seconds"] > 0 and report["final_train_loss"] > 0
    assert report["images"] == 256 and report["unusable_items"] == 0
    judged = report["judge"]
    assert judged["count"] >= 1000
    for kind in ("real", "reconstructed"):
        assert set(judged[kind]) == {"color", "shape", "size", "position"}
        assert all(0 <= v <= 1 for v in judged[kind].values())


def test_default_is_a_vae_and_kl_weight_0_a_plain_autoencoder(trained, small_judge, tmp_path, n2n_train_ae):
    out, _ = trained
    assert json.loads((out / "config.json").read_text())["variational"] is True
    assert json.loads((out / "report.json").read_text())["final_kl_nats"] > 0
    args = [*SMALL[:-6], "--steps", 3, *SMALL[-6:], "--judge", small_judge]
    assert n2n_train_ae(*args, "--kl-weight", 0, "--out", tmp_path / "plain").exit_code == 0
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["variational"] is False
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["final_kl_nats"] == 0


def test_rerun_skips_and_overwrite_retrains(trained, small_judge, n2n_train_ae):
    out, _ = trained
    before = (out / "model.safetensors").read_bytes()
    again = n2n_train_ae(*SMALL, "--out", out, "--judge", small_judge)
    assert again.exit_code == 0 and "already holds an autoencoder" in again.output
    assert (out / "model.safetensors").read_bytes() == before

    redone = n2n_train_ae(*SMALL[:-6], "--steps", 12, *SMALL[-6:], "--out", out, "--judge", small_judge,
                          "--overwrite", "--seed", 1)
    assert redone.exit_code == 0, redone.output
    assert json.loads((out / "report.json").read_text())["steps"] == 12
    assert (out / "model.safetensors").read_bytes() != before


def test_same_seed_same_weights(tmp_path, small_judge, n2n_train_ae):
    args = [*SMALL[:-6], "--steps", 5, *SMALL[-6:], "--judge", small_judge]
    for name in ("a", "b"):
        assert n2n_train_ae(*args, "--out", tmp_path / name).exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "nope"], "unknown dataset 'nope'"),
    (["--data", "biggan"], "has no images"),
    (["--image-size", 40], "must be a multiple of 16"),
    (["--channels", "8,0"], "--channels must be one or more widths >= 1"),
    (["--channels", "8,x"], "--channels '8,x': write comma-separated integers"),
    (["--data-option", "seed"], "--data-option 'seed': write it as KEY=VALUE"),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, message, n2n_train_ae):
    result = n2n_train_ae(*args, "--out", tmp_path / "ae")
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "ae").exists()


def test_the_config_checks_the_api_too():
    with pytest.raises(N2NError, match=r"^batch_size \(--batch-size\) = 0: must be an integer >= 1$"):
        TrainAEConfig(batch_size=0)


def test_out_holding_something_else_is_refused_without_overwrite(tmp_path, n2n_train_ae):
    (tmp_path / "ae").mkdir()
    (tmp_path / "ae" / "notes.txt").write_text("mine")
    result = n2n_train_ae(*SMALL, "--out", tmp_path / "ae")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "ae" / "notes.txt").exists()


# ---------------------------------------------------------------- the judge


def test_judge_predicts_valid_names_and_round_trips(small_judge):
    judge = load_judge(small_judge, train_if_missing=False)
    images, _ = shapes_images("val", 10)
    predicted = judge.predict(images.float() / 255)
    for name, values in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        assert len(predicted[name]) == 10 and set(predicted[name]) <= set(values)
    assert load_judge(small_judge).predict(images.float() / 255) == predicted  # loading is deterministic


def test_missing_judge_is_not_trained_when_told_not_to(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shapes judge"):
        load_judge(tmp_path / "none", train_if_missing=False)


def test_judge_training_is_deterministic():
    a, b = train_judge(steps=3, count=64, seed=5), train_judge(steps=3, count=64, seed=5)
    for (name, pa), pb in zip(a.network.state_dict().items(), b.network.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_augment_blurs_within_range_and_is_seeded():
    x = torch.zeros(2, 3, 64, 64)
    x[:, :, 30:34, 30:34] = 1
    a = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape


class _Fixed(ShapesJudge):
    """A judge whose answers are given, to check accuracy()'s arithmetic."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        return self.answers


def test_accuracy_counts_fractions_per_attribute():
    truth = [{"color": "red", "shape": "circle", "size": "small", "position": "center"},
             {"color": "blue", "shape": "star", "size": "large", "position": "top-left"},
             {"color": "white", "shape": "cross", "size": "large", "position": "bottom-right"},
             {"color": "green", "shape": "square", "size": "small", "position": "center"}]
    answers = {"color": ["red", "blue", "white", "green"], "shape": ["circle", "circle", "cross", "square"],
               "size": ["large", "small", "small", "large"], "position": ["center", "center", "center", "center"]}
    scores = accuracy(_Fixed(answers), torch.zeros(4, 3, 64, 64), truth)
    assert scores == {"color": 1.0, "shape": 0.75, "size": 0.0, "position": 0.5}
    with pytest.raises(ValueError):
        accuracy(_Fixed(answers), torch.zeros(3, 3, 64, 64), truth)


def _pil(image: torch.Tensor):
    from torchvision.transforms.functional import to_pil_image

    return to_pil_image(image)


# ---------------------------------------------------------------- full quality (make test-slow)


@pytest.mark.slow
def test_default_judge_is_right_on_real_held_out_images():
    judge = train_judge()
    images, attributes = shapes_images("val")
    assert len(images) >= 2000
    scores = accuracy(judge, images.float() / 255, attributes)
    assert min(scores.values()) >= 0.99, scores


@pytest.mark.slow
def test_default_autoencoder_keeps_every_attribute(tmp_path, n2n_train_ae):
    result = n2n_train_ae("--out", tmp_path / "ae-shapes", "--judge", tmp_path / "judge-shapes")
    assert result.exit_code == 0, result.output
    judged = json.loads((tmp_path / "ae-shapes" / "report.json").read_text())["judge"]
    assert min(judged["real"].values()) >= 0.99, judged
    assert min(judged["reconstructed"].values()) >= 0.98, judged
