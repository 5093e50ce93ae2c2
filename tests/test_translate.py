"""The whole path on CPU in seconds: extract (real MiniLM + a tiny autoencoder) -> pair -> train -> translate
-> eval."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import n2n
from n2n.evaluate.api import scorer_of
from n2n.evaluate.cli import main as n2n_eval
from n2n.evaluate.cli import print_report
from n2n.extract.cli import main as n2n_extract
from n2n.extract.datasets.shapes import COLORS, POSITIONS, SHAPES, SIZES
from n2n.extract.datasets.shapes_scoring import (
    ShapesScorer,
    consistent,
    normalized_entropy,
    text_to_image_scores,
    uniform_entropy,
)
from n2n.extract.experts.ae import ConvAutoencoder, save_autoencoder
from n2n.shards.view import create_view
from n2n.train.checkpoint import CHECKPOINT, read_meta
from n2n.train.cli import main as n2n_train
from n2n.translate.cli import main as n2n_translate
from n2n.translate.report import score_rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory, invoke) -> dict[str, Path]:
    """Text->image and image->text runs over the same two stores (the point of caching them)."""
    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    ae = save_autoencoder(ConvAutoencoder(image_size=64, channels=(8, 16), latent_dim=16), root / "ae-tiny")
    common = ["--data", "shapes", "--limit", 60, "--num-workers", 0, "--out", root / "shards"]
    assert invoke(n2n_extract, "--expert", "minilm", *common).exit_code == 0
    assert invoke(n2n_extract, "--expert", f"ae:{ae}", *common).exit_code == 0
    text, image = root / "shards/shapes/minilm", root / "shards/shapes/ae-tiny"
    out = {}
    for name, (src, dst) in {"minilm_ae": (text, image), "ae_minilm": (image, text)}.items():
        view = create_view(root / "shards" / name, src, dst)
        result = invoke(n2n_train, "--shards", view, "--out", root / "runs" / name, "--steps", 20, "--eval-every", 20,
                        "--n-flows", 2, "--hidden-dim", 32, "--holdout", 0.2, "--no-compile")
        assert result.exit_code == 0, result.output
        out[name] = root / "runs" / name
    return out


def test_text_to_image_grid(runs, tmp_path, invoke):
    out = tmp_path / "grid.png"
    result = invoke(n2n_translate, "--run", runs["minilm_ae"], "--text", "a small red circle in the top left",
                    "--text", "a blue square", "-n", 3, "--out", out)
    assert result.exit_code == 0, result.output
    grid = Image.open(out)
    assert grid.width >= 3 * 128 and grid.height >= 2 * 128  # 2 rows of 3 samples, enlarged x2, text under
    pixels = np.asarray(grid)
    assert pixels.std() > 10  # not a blank canvas


def test_latents_out_are_reproducible_and_follow_temperature(runs, tmp_path, invoke):
    args = ["--run", runs["minilm_ae"], "--text", "a green star", "-n", 4]
    for name, extra in (("a", []), ("b", []), ("cold", ["--temperature", 0.0])):
        assert invoke(n2n_translate, *args, *extra, "--out", tmp_path / f"{name}.npy").exit_code == 0
    a, b, cold = (np.load(tmp_path / f"{n}.npy", allow_pickle=False) for n in ("a", "b", "cold"))
    assert a.shape == (1, 4, 16) and np.array_equal(a, b)
    assert a.std(1).mean() > 1e-3 and np.allclose(cold.std(1), 0, atol=1e-5)  # T=0: every sample the same
    assert json.loads((tmp_path / "a.json").read_text())["inputs"] == ["a green star"]


def test_image_to_text_writes_latents_and_refuses_a_png(runs, tmp_path, invoke):
    from n2n.extract.datasets import open_dataset

    picture = tmp_path / "shape.png"
    open_dataset("shapes")[0]["image"].save(picture)
    ok = invoke(n2n_translate, "--run", runs["ae_minilm"], "--input", picture, "-n", 2, "--out", tmp_path / "t.npy")
    assert ok.exit_code == 0, ok.output
    assert np.load(tmp_path / "t.npy").shape == (1, 2, 384)
    png = invoke(n2n_translate, "--run", runs["ae_minilm"], "--input", picture, "--out", tmp_path / "t.png")
    assert png.exit_code == 2 and "no decoder" in png.output and not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("problem", ["no_checkpoint", "text_for_image_run", "image_for_text_run", "empty_file",
                                     "nothing"])
def test_bad_input(runs, tmp_path, problem, invoke):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    picture = tmp_path / "p.png"
    Image.new("RGB", (64, 64)).save(picture)
    args = {
        "no_checkpoint": ["--run", tmp_path, "--text", "x"],
        "text_for_image_run": ["--run", runs["ae_minilm"], "--text", "a red circle"],
        "image_for_text_run": ["--run", runs["minilm_ae"], "--input", picture],
        "empty_file": ["--run", runs["minilm_ae"], "--text-file", empty],
        "nothing": ["--run", runs["minilm_ae"]],
    }[problem]
    result = invoke(n2n_translate, *args, "--out", tmp_path / "g.png")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) <= 2
    assert not (tmp_path / "g.png").exists()


def test_normalized_entropy_and_caption_consistency():
    assert normalized_entropy(["a"] * 10, 9) == 0
    assert abs(normalized_entropy([str(i) for i in range(9)] * 3, 9) - 1) < 1e-9
    assert 0 < normalized_entropy(["a", "a", "b"], 2) < 1
    named_color = {"color": True, "shape": False, "size": False, "position": False}
    truth = {
        "img": {"color": "red", "shape": "circle", "size": "small", "position": "center"},
        "cap": {"color": "red", "shape": "square", "size": "large", "position": "top-left",
                "captions": [named_color, dict.fromkeys(named_color, True)]},
    }
    assert consistent(truth, "img", "cap", 0)  # "a red shape" fits a red circle
    assert not consistent(truth, "img", "cap", 1)  # "a large red square in the top left" does not


# ---------------------------------------------------------------- n2n-eval


def test_eval_text_to_image_writes_scores_beside_the_baseline(runs, small_judge, tmp_path, invoke, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table unwrapped, so a row's label reads whole
    out = tmp_path / "eval.json"
    result = invoke(n2n_eval, "--run", runs["minilm_ae"], "--judge", small_judge, "--baseline-steps", 20,
                    "--samples", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert "color accuracy (named)" in result.output and "linear LS" in result.output
    report = json.loads(out.read_text())
    best = read_meta(runs["minilm_ae"] / CHECKPOINT)["best"]  # what n2n-eval scores unless --checkpoint last
    assert np.isfinite(report["heldout_bpd"]) and report["step"] == best["step"] and report["checkpoint"] == "best"
    assert report["heldout_bpd"] == pytest.approx(best["heldout_bpd"], abs=1e-4)
    for model in ("translator", "mlp"):
        assert set(report[model]["accuracy"]) == {"color", "shape", "size", "position"}
        assert all(v is None or 0 <= v <= 1 for v in report[model]["accuracy"].values())
    # A regression predicts one image per caption: whatever the judge reads, the same every time.
    assert all(v in (None, 0.0) for v in report["mlp"]["open_entropy"].values())
    assert report["uniform_entropy"]["size"] == pytest.approx(uniform_entropy(2, 4))
    # The fidelity–diversity curve read by the judge: named attributes' accuracy, open attributes' entropy
    curve = report["curve"]
    assert [p["temperature"] for p in curve["points"]] == [0, 0.1, 0.25, 0.5, 0.75, 1]
    for point in [*curve["points"], curve["baselines"]["mlp"]]:
        assert 0 <= point["judge"] <= 1 and 0 <= point["open_entropy"] <= 1
    assert curve["baselines"]["mlp"]["open_entropy"] == 0  # one image per caption
    assert "the dataset's judge, best on the curve" in result.output
    # eval.png: the table, then decoded held-out samples (the autoencoder decodes): taller than the table alone
    assert set(report["translation"]) >= {"translator", "linear", "mlp"}
    with Image.open(tmp_path / "eval.png") as picture:
        assert picture.format == "PNG" and picture.size[1] > picture.size[0] * 0.8
    # Edits through the residual, beside resampling and the MLP's latent arithmetic, read by the judge.
    edits = report["edits"]
    assert edits["images"] >= 1 and edits["edits"] >= edits["images"]
    for name in ("translator", "resampling", "mlp_arithmetic"):
        assert all(v is None or 0 <= v <= 1 for v in edits[name]["success"].values())
        assert edits[name]["kept_named"] is None or 0 <= edits[name]["kept_named"] <= 1
    assert "edit shape: success" in result.output and "edit by resampling" in result.output
    assert 1 <= len(edits["examples"]) <= 4 and all("→" in example["label"] for example in edits["examples"])
    # The report reads whole alone: its kind and its dataset's rows are in it, as every reader shows them.
    scores = score_rows(report)
    assert report["kind"] == "coupling" and scores.headers[1] == "translator"
    assert [row[0] for row in report["dataset_table"]["rows"]][:1] == ["color accuracy (named)"]
    assert "color accuracy (named)" in [row[0] for row in scores.rows]
    # An eval.json written before the rename (the run's translator as "cinn", no kind) reads the same.
    old = {("cinn" if key == "translator" else key): value for key, value in report.items() if key != "kind"}
    old["translation"] = {("cinn" if key == "translator" else key): value
                          for key, value in report["translation"].items()}
    assert score_rows(old).rows == scores.rows and score_rows(old).headers == scores.headers


def test_eval_image_to_text_scores_retrieval(runs, small_judge, tmp_path, invoke, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table's five columns unwrapped, so a row's label reads whole
    result = invoke(n2n_eval, "--run", runs["ae_minilm"], "--judge", small_judge, "--baseline-steps", 20,
                    "--out", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < report["translator"]["chance"] < 1 and report["translator"]["chance"] == report["mlp"]["chance"]
    assert 0 <= report["translator"]["accuracy"] <= 1 and 0 <= report["mlp"]["accuracy"] <= 1
    assert "nearest caption fits the image" in result.output
    curve = report["curve"]  # the judge of image -> text: the caption nearest one sample fits the image
    assert all(0 <= p["judge"] <= 1 and p["open_entropy"] is None for p in curve["points"])
    assert curve["baselines"]["mlp"]["judge"] == pytest.approx(report["mlp"]["accuracy"])  # one prediction per image
    # What a person reads of text targets: true captions, and the captions nearest to each prediction.
    from n2n.extract.datasets import open_dataset

    shapes = open_dataset("shapes")
    captions = {shapes.key(i): shapes[i]["text"] for i in range(60)}
    every = {text for texts in captions.values() for text in texts}
    shown = report["captions"]
    assert len(shown) == 4 and len({entry["key"] for entry in shown}) == 4  # four different held-out images
    for entry in shown:
        assert entry["truth"] in captions[entry["key"]]
        picks = [entry["linear"], entry["mlp"], *entry["translator"]]
        assert len(entry["translator"]) == 4 and all(p["text"] in every and -1 <= p["cosine"] <= 1 for p in picks)
        assert entry["key"] in result.output
    assert "true caption" in result.output and "sample 4" in result.output  # the printed table of them
    with Image.open(tmp_path / "eval.png") as picture:  # the table, then the captions: taller than the table
        assert picture.size[1] > picture.size[0] * 0.8


def test_eval_without_a_checkpoint_is_a_one_line_error(tmp_path, invoke):
    result = invoke(n2n_eval, "--run", tmp_path)
    assert result.exit_code == 2 and result.output.startswith("error:")
    assert len(result.output.strip().splitlines()) <= 2 and not (tmp_path / "eval.json").exists()


def test_text_to_image_scores_count_named_attributes_and_open_entropy():
    """Scoring with a fake decoder and judge whose reading is known: latents are attribute indices."""
    values = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
    rng = np.random.default_rng(0)
    keys = np.array([f"k{i}" for i in range(40)])
    truth, codes = {}, []
    for i, key in enumerate(keys):
        code = [int(rng.integers(len(v))) for v in values.values()]
        named = dict.fromkeys(values, True) if i % 2 else {"color": True, "shape": True, "size": True,
                                                            "position": False}
        truth[str(key)] = {a: v[c] for (a, v), c in zip(values.items(), code, strict=True)} | {"captions": [named]}
        codes.append(code)
    c = torch.tensor(codes, dtype=torch.float32)

    class Identity:
        def decode(self, latents):
            return latents

    class Reader:
        def predict(self, images):
            return {a: [v[int(x)] for x in images[:, j]] for j, (a, v) in enumerate(values.items())}

    def perfect(rows, n):  # right on every attribute; position open -> uniformly random
        out = rows.repeat_interleave(n, 0).clone()
        out[:, 3] = torch.randint(len(POSITIONS), (len(out),), generator=torch.Generator().manual_seed(1))
        return out

    subs = np.zeros(len(keys), dtype=np.int64)
    scores = text_to_image_scores(perfect, Reader(), Identity(), truth, keys, subs, c, n_open=64, max_rows=40)
    assert scores["accuracy"]["color"] == 1 and scores["captions"] == 40
    assert scores["accuracy"]["position"] < 0.5  # named on half the captions but drawn at random (chance 1/9)
    assert scores["open_entropy"]["position"] == pytest.approx(uniform_entropy(9, 64), abs=0.03)
    assert scores["open_entropy"]["color"] is None  # no caption leaves the colour open
    fixed = text_to_image_scores(lambda rows, n: rows.repeat_interleave(n, 0), Reader(), Identity(), truth, keys,
                                 subs, c, n_open=16, max_rows=40)
    assert fixed["accuracy"]["position"] == 1 and fixed["open_entropy"]["position"] == 0


def test_an_expert_that_cannot_be_loaded_is_named_with_the_flag_to_fix_it(runs, tmp_path, monkeypatch, invoke):
    import n2n.extract.experts.ae as ae

    def gone(path):
        raise FileNotFoundError(f"no autoencoder at {path}")

    monkeypatch.setattr(ae, "load_autoencoder", gone)  # as if experts/ae-tiny had been deleted
    result = invoke(n2n_translate, "--run", runs["minilm_ae"], "--text", "a red circle", "--out", tmp_path / "g.png")
    assert result.exit_code == 2 and result.output.startswith("error: target expert ae:")
    assert "--target-weights" in result.output and not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------- n2n-eval: the dataset's scorer, the arguments


def test_scorer_of_asks_the_dataset_both_stores_name():
    header = lambda source, target: {"source": {"dataset": source}, "target": {"dataset": target}}  # noqa: E731
    assert isinstance(scorer_of(header({"name": "shapes"}, {"name": "shapes"})), ShapesScorer)
    for source, target in [({"name": "coco"},) * 2, ({"name": "shapes"}, {"name": "coco"}), (None, None),
                           ({"name": "not-installed"},) * 2]:
        assert scorer_of(header(source, target)) is None


def test_eval_of_a_dataset_without_a_scorer_reports_the_generic_metrics(runs, tmp_path, invoke):
    """The text -> image run with its stores' dataset renamed to coco, which keeps ItemDataset's default hook."""
    from n2n.train.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(runs["minilm_ae"] / CHECKPOINT)
    for side in ("source", "target"):
        meta[side]["dataset"]["name"] = "coco"
    run = runs["minilm_ae"].with_name("minilm_ae-coco")  # beside it: its view record still resolves
    run.mkdir(exist_ok=True)
    save_checkpoint(run / CHECKPOINT, tensors, meta)
    result = invoke(n2n_eval, "--run", run, "--out", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"run", "view", "step", "checkpoint", "kind", "heldout_bpd", "linear_gaussian_bpd",
                           "translation", "curve", "figure"}
    assert all("judge" not in point for point in report["curve"]["points"])  # no scorer: the generic scores only
    assert np.isfinite(report["heldout_bpd"]) and set(report["translation"]) >= {"translator", "linear", "mlp"}
    assert "held-out NLL" in result.output and "accuracy" not in result.output


def test_print_report_of_a_saved_report_prints_the_dataset_rows(runs, capsys, monkeypatch):
    """What `make demo` does with eval.json: the dataset's rows are in the report; one written before they were
    gets them from the scorer of the run it names."""
    monkeypatch.setenv("COLUMNS", "200")  # the table's five columns unwrapped, so a row's label reads whole
    report = json.loads(json.dumps(n2n.evaluate(runs["ae_minilm"], samples=2, baseline_steps=5, progress=False)))
    capsys.readouterr()
    print_report(report)
    assert "nearest caption fits the image" in capsys.readouterr().out
    print_report({**report, "run": str(runs["ae_minilm"]) + "-gone"})  # recorded: the run is not needed
    assert "nearest caption fits the image" in capsys.readouterr().out
    old = {key: value for key, value in report.items() if key != "dataset_table"}
    print_report(old)
    assert "nearest caption fits the image" in capsys.readouterr().out
    print_report({**old, "run": str(runs["ae_minilm"]) + "-gone"})
    out = capsys.readouterr().out
    assert "held-out NLL" in out and "nearest caption" not in out and "only the NLL" in out


BAD_EVAL = [("samples", 0), ("samples", 5000), ("samples", 1.5), ("temperature", -1.0), ("temperature", float("nan")),
            ("temperature", float("inf")), ("max_rows", 0), ("seed", -1), ("baseline_steps", 0)]


@pytest.mark.parametrize(("name", "value"), BAD_EVAL)
def test_evaluate_checks_every_number_before_loading_anything(name, value, tmp_path):
    """The run does not exist: a range error (not 'no checkpoint') shows that nothing was loaded first."""
    with pytest.raises(n2n.N2NError, match=rf"^{name} \(--{name.replace('_', '-')}\) = .*: must be"):
        n2n.evaluate(tmp_path / "no-run", **{name: value})




def test_a_scorer_or_report_of_the_former_names_still_reads():
    """A plug-in scorer that asks for the run's translator as "cinn", and an eval.json that calls it so."""
    from n2n.scoring import Predictors, upgrade_report

    def predict(c, n):
        return c

    predictors = Predictors(translator=predict, mlp=predict)
    with pytest.warns(DeprecationWarning, match="predictors\\['translator'\\]"):
        assert predictors["cinn"] is predict
    with pytest.raises(KeyError):
        predictors["other"]
    assert list(predictors) == ["translator", "mlp"]
    old = {"cinn": {"accuracy": 0.5}, "mlp": {"accuracy": 0.4}, "translation": {"cinn": {"cosine": 0.1}}}
    assert upgrade_report(old) == {"translator": {"accuracy": 0.5}, "mlp": {"accuracy": 0.4},
                                   "translation": {"translator": {"cosine": 0.1}}}
