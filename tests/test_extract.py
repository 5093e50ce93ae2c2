"""n2n-extract end to end: real MiniLM weights on shapes, exact resume after kill -9, layers, bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from n2n.shards import open_store

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def test_minilm_on_shapes(tmp_path, n2n_extract):
    result = n2n_extract("--expert", "minilm", "--data", "shapes", "--limit", 24, "--batch-size", 8,
                         "--num-workers", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "shapes" / "minilm")
    assert store.dim == 384 and store.complete
    items = np.unique(store.keys)
    assert len(items) == 24 and len(store) % 24 == 0 and len(store) > 24  # several captions per item
    assert set(store.sub.tolist()) == set(range(len(store) // 24))
    norms = np.linalg.norm(store.latents().astype(np.float32), axis=1)
    assert np.allclose(norms, 1, atol=1e-2)  # MiniLM's sentence embeddings are L2-normalised
    meta = store.meta
    assert meta["expert"]["spec"].startswith("minilm") and meta["expert"]["digest"]
    assert meta["dataset"]["name"] == "shapes" and meta["split"] == "train"
    attributes = [json.loads(line) for line in (store.path / "attributes.jsonl").read_text().splitlines()]
    assert [a["key"] for a in attributes] == sorted(items.tolist(), key=store.keys.tolist().index)
    assert {"color", "shape", "size", "position"} <= attributes[0].keys()

    again = n2n_extract("--expert", "minilm", "--data", "shapes", "--limit", 24, "--out", tmp_path)
    assert again.exit_code == 0 and "already complete" in again.output


@pytest.mark.parametrize("workers", [["--num-workers", 0], []], ids=["in-process", "default-forked-workers"])
def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path, n2n_extract, same_store, killed_extraction,
                                                         workers):
    """The rerun comes at once, as a scheduler's requeue does: with forked loader workers, the ones the kill
    left behind may still be alive, and hold nothing (the store's lock is the killed writer's alone)."""
    args = ["--expert", "minilm", "--data", "shapes", "--limit", 240, "--batch-size", 8, *workers,
            "--dtype", "float32", "--commit-every", 0, "--device", "cpu"]
    assert n2n_extract(*args, "--out", tmp_path / "clean").exit_code == 0
    out = tmp_path / "crashed"
    killed_extraction(args, out, Path("shapes") / "minilm", 300)
    result = n2n_extract(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "resuming at item" in result.output
    same_store(tmp_path / "clean" / "shapes" / "minilm", out / "shapes" / "minilm")


def test_several_layers_from_one_pass_equal_separate_runs(tmp_path, n2n_extract, same_store):
    common = ["--data", "shapes", "--limit", 8, "--num-workers", 0]
    result = n2n_extract("--expert", "minilm", *common, "--layers", "mean,cls", "--out", tmp_path / "both")
    assert result.exit_code == 0, result.output
    assert n2n_extract("--expert", "minilm@cls", *common, "--out", tmp_path / "one").exit_code == 0
    mean, cls = open_store(tmp_path / "both/shapes/minilm@mean"), open_store(tmp_path / "both/shapes/minilm@cls")
    assert not np.allclose(mean.latents(), cls.latents())
    same_store(tmp_path / "both/shapes/minilm@cls", tmp_path / "one/shapes/minilm@cls")


def test_identical_captions_give_identical_latents(tmp_path, n2n_extract):
    from n2n.extract.datasets import open_dataset

    assert n2n_extract("--expert", "minilm", "--data", "shapes", "--limit", 200, "--num-workers", 0,
                       "--batch-size", 32, "--out", tmp_path).exit_code == 0
    store, shapes = open_store(tmp_path / "shapes" / "minilm"), open_dataset("shapes")
    texts = np.array([shapes[i]["text"][s] for i in range(200) for s in range(len(shapes[i]["text"]))])
    assert np.array_equal(store.keys, np.repeat([shapes.key(i) for i in range(200)], len(texts) // 200))
    latents = store.latents().astype(np.float32)
    repeated = [t for t, n in zip(*np.unique(texts, return_counts=True), strict=True) if n > 1]
    assert repeated, "shapes should repeat some captions in 1000"
    for text in repeated:  # whatever batch and padding they were encoded in
        rows = latents[texts == text]
        assert np.abs(rows - rows[0]).max() < 2e-3, text


def test_coco_captions_and_images_go_to_two_stores_that_pair(tmp_path, n2n_extract, write_coco):
    from n2n.extract.experts.ae import ConvAutoencoder, save_autoencoder
    from n2n.shards.view import create_view, open_view

    root = write_coco(tmp_path / "coco")
    ae = save_autoencoder(ConvAutoencoder(image_size=64, channels=(8, 16), latent_dim=16), tmp_path / "ae-coco")
    common = ["--data", "coco", "--data-root", root, "--num-workers", 0, "--out", tmp_path / "shards"]
    assert n2n_extract("--expert", "minilm", *common).exit_code == 0
    assert n2n_extract("--expert", f"ae:{ae}", *common).exit_code == 0
    text, images = open_store(tmp_path / "shards/coco/minilm"), open_store(tmp_path / "shards/coco/ae-coco")
    assert len(np.unique(images.keys)) == len(images) and set(images.sub.tolist()) == {0}
    per_image = {k: sorted(text.sub[text.keys == k].tolist()) for k in np.unique(text.keys)}
    assert all(subs == list(range(len(subs))) for subs in per_image.values())
    assert set(per_image) <= set(images.keys.tolist())
    join = open_view(create_view(tmp_path / "shards/minilm_ae", text.path, images.path)).join()
    assert len(join) == sum(len(v) for v in per_image.values())
    assert np.array_equal(images.keys[join.target_index], text.keys[join.source_index])


def test_dataset_options_reach_the_dataset(tmp_path, n2n_extract):
    result = n2n_extract("--expert", "minilm", "--data", "biggan", "--data-option", "classes=207,980",
                         "--data-option", "count=12", "--num-workers", 0, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "biggan" / "minilm")
    assert len(store) == 12 and store.meta["dataset"]["classes"] == [207, 980]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--expert", "nosuch", "--data", "shapes"], "minilm"),
        (["--expert", "minilm", "--data", "nosuch"], "shapes"),
        (["--expert", "minilm@nosuch", "--data", "shapes"], "mean"),
        (["--expert", "minilm", "--data", "shapes", "--layers", "nosuch"], "mean"),
        (["--expert", "minilm", "--data", "coco", "--data-root", "/nonexistent/coco"], "/nonexistent/coco"),
    ],
)
def test_bad_input_is_one_clear_line(args, says, tmp_path, n2n_extract):
    result = n2n_extract(*args, "--limit", 4, "--num-workers", 0, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and says in result.output
    assert not any(tmp_path.rglob("meta.json"))


def test_a_store_of_another_origin_is_not_resumed(tmp_path, n2n_extract):
    base = ["--expert", "minilm", "--data", "shapes", "--num-workers", 0, "--out", tmp_path]
    assert n2n_extract(*base, "--limit", 4).exit_code == 0
    assert n2n_extract(*base, "--limit", 4, "--split", "val").exit_code == 0  # its own folder
    assert open_store(tmp_path / "shapes-val" / "minilm").meta["split"] == "val"
    refused = n2n_extract(*base, "--limit", 8)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert n2n_extract(*base, "--limit", 8, "--overwrite").exit_code == 0
    assert len(np.unique(open_store(tmp_path / "shapes" / "minilm").keys)) == 8


# ---------------------------------------------------------------- every expert family through n2n-extract


def shapes_folder(root: Path, n: int = 12) -> Path:
    """An ImageNet-layout folder of rendered shapes, one class per shape kind."""
    from n2n.extract.datasets import open_dataset

    shapes = open_dataset("shapes")
    for i in range(n):
        attrs = shapes.attributes(i)
        (root / attrs["shape"]).mkdir(parents=True, exist_ok=True)
        shapes[i]["image"].save(root / attrs["shape"] / f"img{i:03d}.png")
    return root


def test_timm_on_a_folder_skips_and_records_a_corrupt_image(tmp_path, resnet18_file, n2n_extract):
    root = shapes_folder(tmp_path / "images")
    broken = next(root.iterdir()) / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    args = ["--expert", "timm:resnet18@stage3", "--weights", resnet18_file, "--data", "folder", "--data-root", root,
            "--num-workers", 0, "--batch-size", 4, "--out", tmp_path / "shards"]
    result = n2n_extract(*args)
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "shards" / "folder" / "timm-resnet18@stage3")
    assert len(store) == 12 and store.dim == 256 and set(store.sub.tolist()) == {0}
    errors = [json.loads(line) for line in (store.path / "errors.jsonl").read_text().splitlines()]
    assert [e["key"] for e in errors] == [f"{broken.parent.name}/broken"] and errors[0]["reason"]
    assert "1 (see errors.jsonl)" in result.output

    failed = n2n_extract(*args[:-1], tmp_path / "strict", "--on-error", "fail")
    assert failed.exit_code == 2 and "broken" in failed.output
    meta = json.loads((tmp_path / "strict" / "folder" / "timm-resnet18@stage3" / "meta.json").read_text())
    assert meta["complete"] is False  # nothing that looks complete


def test_bert_and_autoencoder_on_shapes(tmp_path, n2n_extract):
    from conftest import save_tiny_bert

    from n2n.extract.experts.ae import ConvAutoencoder, save_autoencoder

    torch.manual_seed(0)
    bert = save_tiny_bert(tmp_path / "tiny-bert", seed=0)
    ae = save_autoencoder(ConvAutoencoder(image_size=64, channels=(8, 16), latent_dim=24), tmp_path / "ae-tiny")
    common = ["--data", "shapes", "--limit", 10, "--num-workers", 0, "--out", tmp_path / "shards"]
    assert n2n_extract("--expert", f"bert:{bert}@cls", *common).exit_code == 0
    assert n2n_extract("--expert", f"ae:{ae}", *common).exit_code == 0
    text = open_store(tmp_path / "shards" / "shapes" / "bert-tiny-bert@cls")
    images = open_store(tmp_path / "shards" / "shapes" / "ae-tiny")
    assert text.dim == 32 and len(text) == 50 and images.dim == 24 and len(images) == 10
    # Many captions onto one image: the view joins them, and the cINN trains from the stores alone.
    from n2n.shards.view import create_view, open_view
    from n2n.train.cli import main as n2n_train

    view = create_view(tmp_path / "shards" / "bert_ae", text.path, images.path)
    assert len(open_view(view).join()) == 50
    trained = CliRunner().invoke(n2n_train, ["--shards", str(view), "--out", str(tmp_path / "run"), "--steps", "10",
                                             "--eval-every", "10", "--n-flows", "2", "--hidden-dim", "16",
                                             "--holdout", "0.2", "--no-compile"])
    assert trained.exit_code == 0, trained.output


def test_biggan_latents_of_the_biggan_dataset(tmp_path, n2n_extract):
    from conftest import save_tiny_biggan

    weights = save_tiny_biggan(tmp_path / "biggan", seed=0)
    result = n2n_extract("--expert", "biggan:biggan-deep-128", "--weights", weights, "--data", "biggan",
                         "--limit", 6, "--num-workers", 0, "--out", tmp_path / "shards")
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "shards" / "biggan" / "biggan-deep-128")
    assert store.dim == 256 and len(store) == 6
    assert np.isfinite(store.latents()).all()
