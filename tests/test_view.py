"""Views: joining two stores on the item key, and the view.json that names them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from n2n.shards import StoreError, create_store
from n2n.shards import view as view_module
from n2n.shards.view import View, ViewError, create_view, open_view


def store(path: Path, keys, sub=None, dim: int = 3, **meta) -> Path:
    """A complete store whose latent row i is (i, i, ...): a pair's rows can be read off its latents."""
    keys = np.asarray(keys)
    sub = np.zeros(len(keys), np.int64) if sub is None else np.asarray(sub)
    latents = np.repeat(np.arange(len(keys), dtype=np.float32)[:, None], dim, axis=1)
    with create_store(path, dim=dim, dtype="float32", meta=meta or None) as writer:
        writer.append(keys, sub, latents)
    return path


def pairs(view) -> list[tuple[int, int, str]]:
    join = view.join()
    assert join.source_index.dtype == np.int64 and join.target_index.dtype == np.int64
    assert join.key.dtype.kind == "U" and len(join) == len(join.key)
    return list(zip(join.source_index.tolist(), join.target_index.tolist(), join.key.tolist(), strict=True))


def test_one_to_one_pairs_equal_keys_in_source_order(tmp_path):
    store(tmp_path / "a", ["x", "y.jpg", "z/1"])
    store(tmp_path / "b", ["z/1", "x", "y.jpg"])
    view = open_view(create_view(tmp_path / "v", tmp_path / "a", tmp_path / "b"))
    assert pairs(view) == [(0, 1, "x"), (1, 2, "y.jpg"), (2, 0, "z/1")]


def test_captions_join_many_to_one_onto_images(tmp_path):
    images = ["img2", "img0", "img1"]
    captions = np.array([f"img{i % 3}" for i in range(15)])  # each image has 5 captions, interleaved
    store(tmp_path / "img", images)
    store(tmp_path / "cap", captions, sub=np.arange(15) // 3)
    view = open_view(create_view(tmp_path / "v", tmp_path / "cap", tmp_path / "img"))
    assert pairs(view) == [(i, images.index(key), key) for i, key in enumerate(captions)]


def test_images_join_one_to_many_onto_captions(tmp_path):
    store(tmp_path / "img", ["b", "a"])
    store(tmp_path / "cap", ["a", "b", "a", "b", "a"], sub=[0, 0, 1, 1, 2])
    view = open_view(create_view(tmp_path / "v", tmp_path / "img", tmp_path / "cap"))
    assert pairs(view) == [(0, 1, "b"), (0, 3, "b"), (1, 0, "a"), (1, 2, "a"), (1, 4, "a")]


def test_caption_stores_join_on_key_and_sub(tmp_path):
    store(tmp_path / "bert", ["a", "a", "b", "b"], sub=[0, 1, 0, 1])
    store(tmp_path / "minilm", ["b", "a", "b", "a"], sub=[1, 1, 0, 0])
    view = open_view(create_view(tmp_path / "v", tmp_path / "bert", tmp_path / "minilm"))
    assert pairs(view) == [(0, 3, "a"), (1, 1, "a"), (2, 2, "b"), (3, 0, "b")]


def test_repeated_key_sub_on_both_sides_is_ambiguous(tmp_path):
    store(tmp_path / "a", ["k", "k", "j"], sub=[0, 1, 0])
    store(tmp_path / "b", ["k", "k", "j", "j"], sub=[0, 0, 0, 1])
    with pytest.raises(ViewError, match=f"store {tmp_path / 'b'} repeats"):
        create_view(tmp_path / "v", tmp_path / "a", tmp_path / "b")


def test_partial_overlap_drops_rows_without_partner(tmp_path):
    store(tmp_path / "a", ["only-a", "both1", "both2"])
    store(tmp_path / "b", ["both2", "only-b", "both1"])
    view = open_view(create_view(tmp_path / "v", tmp_path / "a", tmp_path / "b"))
    assert pairs(view) == [(1, 2, "both1"), (2, 0, "both2")]


def test_no_shared_key_is_refused_naming_both_stores(tmp_path):
    store(tmp_path / "a", ["1", "2"])
    store(tmp_path / "b", ["3", "4"])
    with pytest.raises(ViewError, match=f"{tmp_path / 'a'} and {tmp_path / 'b'} share no key"):
        create_view(tmp_path / "v", tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    ("meta_a", "meta_b", "refused"),
    [
        ({"dataset": {"name": "coco"}}, {"dataset": {"name": "flickr"}}, True),
        ({"split": "train"}, {"split": "val"}, True),
        ({"dataset": {"name": "coco"}, "split": "train"}, {"dataset": {"name": "coco"}}, False),
        ({"dataset": {"name": "coco"}}, {}, False),
    ],
)
def test_stores_of_different_datasets_or_splits_are_refused(tmp_path, meta_a, meta_b, refused):
    store(tmp_path / "a", ["k"], **meta_a)
    store(tmp_path / "b", ["k"], **meta_b)
    if refused:
        with pytest.raises(ViewError, match="come from different"):
            create_view(tmp_path / "v", tmp_path / "a", tmp_path / "b")
    else:
        create_view(tmp_path / "v", tmp_path / "a", tmp_path / "b")


def test_view_json_is_relative_and_the_root_can_move(tmp_path):
    root = tmp_path / "shards"
    store(root / "coco" / "bert", ["a", "b"])
    store(root / "coco" / "ae", ["b", "a"])
    path = create_view(root / "bert_ae", root / "coco" / "bert", root / "coco" / "ae")
    assert sorted(p.name for p in path.iterdir()) == ["view.json"]  # no latents copied
    assert json.loads((path / "view.json").read_text()) == {
        "n2n_view": 1,
        "source": "../coco/bert",
        "target": "../coco/ae",
    }
    shutil.move(root, tmp_path / "moved")
    view = open_view(tmp_path / "moved" / "bert_ae")
    assert view.name == "bert_ae" and len(view.source) == 2
    assert pairs(view) == [(0, 1, "a"), (1, 0, "b")]


def test_view_refuses_incomplete_stores(tmp_path):
    store(tmp_path / "a", ["k"])
    writer = create_store(tmp_path / "b", dim=3)
    writer.append(["k"], [0], np.zeros((1, 3)))
    writer.flush()
    with pytest.raises(StoreError, match="incomplete"):
        create_view(tmp_path / "v", tmp_path / "a", tmp_path / "b")


def test_missing_or_invalid_view(tmp_path):
    with pytest.raises(ViewError, match=f"no view at {tmp_path / 'nope'}"):
        open_view(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "view.json").write_text('{"source": "a"}')
    with pytest.raises(ViewError, match=f"invalid {tmp_path / 'bad' / 'view.json'}"):
        open_view(tmp_path / "bad")


def fake_view(source_keys, target_keys, source_sub=None, target_sub=None) -> View:
    """A View over in-memory columns: the join needs only keys, sub and paths."""

    def side(name, keys, sub):
        sub = np.zeros(len(keys), np.int64) if sub is None else sub
        return SimpleNamespace(path=Path(name), keys=keys, sub=sub)

    return View(Path("v"), side("a", source_keys, source_sub), side("b", target_keys, target_sub))


def test_a_hash_collision_falls_back_to_exact_keys(monkeypatch):
    monkeypatch.setattr(view_module, "hash_keys", lambda keys: np.zeros(len(keys), np.uint64))
    view = fake_view(np.array(["x", "y", "x", "q"]), np.array(["y", "x"]))
    assert pairs(view) == [(0, 1, "x"), (1, 0, "y"), (2, 1, "x")]


def test_a_million_captions_join_onto_200k_images():
    """Correct at COCO scale (its speed is a benchmark's business, not a test's)."""
    rng = np.random.default_rng(0)
    images = np.char.add("COCO_train2014_", rng.permutation(200_000).astype("U12"))
    captions = np.repeat(images, 5)
    rng.shuffle(captions)
    join = fake_view(captions, images).join()
    assert len(join) == 1_000_000 and np.array_equal(images[join.target_index], captions)
    assert np.array_equal(join.source_index, np.arange(1_000_000))
