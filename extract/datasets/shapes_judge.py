"""A judge that reads the four ``shapes`` attributes back off pixels, to score generated images.

Text-to-image on ``shapes`` is measurable because the renderer knows every image's colour, shape,
size and position; what is missing is a reader for images the renderer did not draw (decoded
samples, autoencoder reconstructions). The judge is a small CNN with one head per attribute,
trained on real rendered ``train`` images with augmentation that imitates an autoencoder's output
(gaussian blur, a little noise, a slight contrast change), so it stays right on slightly blurry
images and does not mistake "a bit soft" for "wrong". Training is deterministic from the seed
(fixed data order, seeded augmentation) and takes about a minute on two CPU cores; the result is
saved once (safetensors + JSON config, written atomically) and loaded from then on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from n2n.extract.datasets.shapes_world import COLORS, DEFAULT_COUNT, POSITIONS, SHAPES, SIZES, draw_item, render

FORMAT = "n2n-shapes-judge"
CONFIG, WEIGHTS = "config.json", "model.safetensors"
CLASSES = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
DEFAULT_PATH = "experts/judge-shapes"
IMAGE_SIZE = 64
MAX_SIGMA = 1.2  # blur the augmentation may add, in pixels: about what a good autoencoder leaves behind
BLUR_RADIUS = 4  # kernel taps each side: covers 3 sigma of MAX_SIGMA


class JudgeNet(nn.Module):
    """[B, 3, 64, 64] in [0, 1] -> logits per attribute.

    Four conv + pool stages keep a 4x4 map before the heads: position needs to know *where*,
    so the features are flattened rather than pooled globally.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64), hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip([3, *channels[:-1]], channels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        side = IMAGE_SIZE // 2 ** len(channels)
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels[-1] * side * side, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in CLASSES.items()})
        self.config = {"channels": list(channels), "hidden": hidden}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


class ShapesJudge:
    """A trained JudgeNet in eval mode, with class names instead of indices."""

    def __init__(self, network: JudgeNet) -> None:
        self.network = network.eval()

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Images [B, 3, 64, 64] float in [0, 1] -> {attribute: [class name per image]}."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the shapes judge reads images [B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}], "
                             f"not {list(images.shape)}")
        device = next(self.network.parameters()).device
        picks: dict[str, list[int]] = {name: [] for name in CLASSES}
        for chunk in images.split(256):
            logits = self.network(chunk.to(device, torch.float32))
            for name in CLASSES:
                picks[name] += logits[name].argmax(1).tolist()
        return {name: [CLASSES[name][i] for i in picks[name]] for name in CLASSES}


def accuracy(judge: ShapesJudge, images: torch.Tensor, attributes: list[dict]) -> dict[str, float]:
    """Share of images whose predicted attribute equals the ground truth, per attribute."""
    if len(images) != len(attributes) or not attributes:
        raise ValueError(f"accuracy needs one attribute dict per image and at least one image, "
                         f"not {len(images)} images and {len(attributes)} dicts")
    predicted = judge.predict(images)
    return {name: sum(p == a[name] for p, a in zip(predicted[name], attributes, strict=True)) / len(attributes)
            for name in CLASSES}


# ---------------------------------------------------------------- data


def shapes_images(split: str, count: int | None = None, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """The first ``count`` items of a ``shapes`` split as uint8 [N, 3, 64, 64] and their attributes.

    uint8 keeps 20k images at 245 MB; callers convert batches to float as they use them.
    """
    n = DEFAULT_COUNT[split] if count is None else min(count, DEFAULT_COUNT[split])
    attributes = [draw_item(seed, split, i)[0] for i in range(n)]
    pixels = np.stack([np.asarray(render(a, IMAGE_SIZE)) for a in attributes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), attributes


def label_tensor(attributes: list[dict]) -> torch.Tensor:
    """Class indices [N, 4], in CLASSES order."""
    return torch.tensor([[CLASSES[name].index(a[name]) for name in CLASSES] for a in attributes])


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Make real images look like autoencoder output: per-image blur, contrast and noise, from ``generator``."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=generator) * MAX_SIGMA
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float32)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [B*3, taps]: one per channel
    flat = x.reshape(1, b * 3, *x.shape[2:])
    flat = F.conv2d(F.pad(flat, (BLUR_RADIUS,) * 4, mode="replicate"), kernel[:, None, None, :], groups=b * 3)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * 3)
    x = flat.reshape_as(x)
    contrast = 0.9 + 0.2 * torch.rand(b, 1, 1, 1, generator=generator)
    mean = x.mean((1, 2, 3), keepdim=True)
    noise = torch.randn(x.shape, generator=generator) * 0.03 * torch.rand(b, 1, 1, 1, generator=generator)
    return ((x - mean) * contrast + mean + noise).clamp(0, 1)


# ---------------------------------------------------------------- training, saving, loading


def train_judge(steps: int = 800, seed: int = 0, batch_size: int = 64, lr: float = 2e-3, count: int = 20000,
                console: Console | None = None) -> ShapesJudge:
    """Train a judge on the first ``count`` real ``train`` images; same seed, same weights."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, attributes = shapes_images("train", count)
    labels = label_tensor(attributes)
    network = JudgeNet()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    order = torch.empty(0, dtype=torch.long)
    network.train()
    with _progress(console) as progress:
        task = progress.add_task("training the shapes judge", total=steps, loss=float("nan"))
        for _ in range(steps):
            if len(order) < batch_size:  # a fresh permutation per epoch: every image seen once per pass
                order = torch.cat([order, torch.randperm(len(images), generator=generator)])
            index, order = order[:batch_size], order[batch_size:]
            logits = network(augment(images[index].float() / 255, generator))
            loss = sum(F.cross_entropy(logits[name], labels[index, k]) for k, name in enumerate(CLASSES))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update(task, advance=1, loss=loss.item())
    return ShapesJudge(network)


def _progress(console: Console | None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                    console=console or Console(stderr=True), disable=console is None, transient=True)


def save_judge(judge: ShapesJudge, path: str | Path) -> Path:
    """Write the judge to the folder ``path`` atomically (safetensors + config.json)."""
    from n2n.extract.experts import save_model_folder

    config = {"format": FORMAT, **judge.network.config, "classes": {k: list(v) for k, v in CLASSES.items()}}
    return save_model_folder(judge.network, config, path, WEIGHTS, CONFIG)


def _read_judge(path: Path) -> ShapesJudge:
    from safetensors.torch import load_model

    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG} is not a shapes judge config (format {FORMAT!r})")
    if config.get("classes") != {k: list(v) for k, v in CLASSES.items()}:
        raise ValueError(f"{path} was trained on other shapes classes; delete it to retrain")
    network = JudgeNet(tuple(config["channels"]), config["hidden"])
    load_model(network, str(path / WEIGHTS))
    return ShapesJudge(network)


def load_judge(path: str | Path = DEFAULT_PATH, train_if_missing: bool = True,
               console: Console | None = None) -> ShapesJudge:
    """The judge saved at ``path``; trained (about a minute) and saved there first if there is none."""
    path = Path(path)
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        return _read_judge(path)
    if not train_if_missing:
        raise FileNotFoundError(f"no shapes judge at {path}: expected {path / CONFIG} and {path / WEIGHTS}")
    started = time.perf_counter()
    judge = train_judge(console=console)
    save_judge(judge, path)
    if console is not None:
        console.print(f"trained the shapes judge in {time.perf_counter() - started:.0f} s; saved to {path}")
    return judge
