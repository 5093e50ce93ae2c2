"""Training from shards vs the reference way: both frozen experts inside every training step.

net2net's training step runs its experts on every batch: sample z and a class, render the BigGAN
image, embed the caption with BERT, then one cINN step. n2n runs them once (n2n-extract) and each
step is an index gather from the view's arrays plus the same cINN step. This benchmark times both
with the same cINN, batch size and optimiser, and the experts' real encode/decode calls (n2n's
expert classes, random weights built from the real configurations: timing does not need trained
weights). Each way runs in its own process so that its peak memory is its own.

Pairs: ``bert_biggan`` (BERT-base -> BigGAN-deep-256, net2net's cINN size; BERT's tokenizer is a
WordPiece vocabulary of the captions' words and the characters, ``bench.models.save_bert``, as no
vocabulary file travels to the GPU machines) and ``minilm_ae`` (the real MiniLM -> the shapes
autoencoder, the demo's cINN size).

``--device cuda``: both ways run there, the experts in float32 as net2net ran them, the view's rows
held on the GPU as n2n-train holds a view that fits; steps are timed to the GPU's finish and the
memory row compares the GPU's peak allocation instead of the process's RSS. ``--tiny``: BigGAN and the
cINN at test size (BERT-base's own cost is small), a smoke run of the code path whose ratios mean nothing.
Run: python -m bench.reference [--device cuda --pair bert_biggan --pair minilm_ae]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import torch

from bench.common import DEVICE_OPTION, Row, peak_rss_mib, report, timed, trainer_step
from bench.models import save_bert
from n2n.cinn import ConditionalFlow, FlowConfig
from n2n.extract.experts import Expert, load_expert
from n2n.train.data import PairedLatents, Rows, Standardizer

# BigGAN-deep-256's generator layout (pytorch-pretrained-biggan's published config): 4x4 -> 256x256.
BIGGAN_DEEP_256 = {"output_dim": 256, "z_dim": 128, "class_embed_dim": 128, "channel_width": 128,
                   "num_classes": 1000, "attention_layer_position": 8,
                   "layers": [(False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
                              (True, 8, 8), (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
                              (False, 2, 2), (True, 2, 1)]}
TINY_BIGGAN = {**BIGGAN_DEEP_256, "channel_width": 8}  # the same blocks at 1/16 of the channels
TINY_FLOWS = 2
PAIRS = {
    "bert_biggan": {"dims": (768, 256), "flow": {"n_flows": 24, "hidden_dim": 1024}, "ref_steps": 1},
    "minilm_ae": {"dims": (384, 32), "flow": {"n_flows": 8, "hidden_dim": 192, "embedding_dim": 256},
                  "ref_steps": 3},
}
TARGET = {"bert_biggan": 50.0}
ROOT = Path(__file__).resolve().parent.parent  # where ``python -m bench.reference`` finds the children's module
RENDER_CHUNK = 32  # images rendered per generator call: bounds the reference's activation memory
# the memory row's figure: on a GPU the process's RSS says little of what training holds
MEMORY = {"cpu": ("peak_rss_mib", "peak memory (RSS)"), "cuda": ("peak_cuda_mib", "peak GPU memory (allocated)")}


def caption_words() -> list[str]:
    """The words of the biggan dataset's captions (its templates, the 1000 class names), lowercased as
    an uncased BERT reads them: with them whole in the vocabulary a caption is about as many tokens as
    bert-base-uncased's vocabulary makes it."""
    from n2n.extract.datasets.biggan import TEMPLATES, class_names

    return sorted(set(re.findall(r"[a-z0-9]+", " ".join([*TEMPLATES, *class_names()]).lower())))


def build_experts(pair: str, folder: Path, device: torch.device, tiny: bool = False):
    """(source expert, target expert, dataset) on ``device``, with random weights of the real shapes
    (BigGAN at test size where ``tiny``)."""
    if pair == "bert_biggan":
        from pytorch_pretrained_biggan import BigGAN, BigGANConfig
        from safetensors.torch import save_file

        from n2n.extract.datasets.biggan import BigGANDataset

        save_bert(folder / "bert", words=caption_words())  # bert-base: 12 layers, hidden 768
        config = BigGANConfig(**(TINY_BIGGAN if tiny else BIGGAN_DEEP_256))
        generator = BigGAN(config)
        with torch.no_grad():
            generator.generator.bn.weight.fill_(1)  # the package leaves these uninitialised
            generator.generator.bn.bias.zero_()
        (folder / "biggan").mkdir()
        (folder / "biggan" / "config.json").write_text(config.to_json_string())
        save_file(generator.state_dict(), str(folder / "biggan" / "model.safetensors"))
        source = load_expert(f"bert:{folder / 'bert'}")
        target = load_expert("biggan:biggan-deep-256", weights=folder / "biggan")
        dataset = BigGANDataset(count=1_000_000, model="biggan-deep-256").with_modalities(["biggan", "text"])
    else:
        from n2n.extract.datasets.shapes import ShapesDataset
        from n2n.extract.experts.ae import ConvAutoencoder, save_autoencoder
        from n2n.extract.train_ae import TrainAEConfig

        cfg = TrainAEConfig()
        save_autoencoder(ConvAutoencoder(cfg.image_size, cfg.channels, cfg.latent_dim, variational=True),
                         folder / "ae-shapes")
        source, target = load_expert("minilm"), load_expert(f"ae:{folder / 'ae-shapes'}")
        dataset = ShapesDataset().with_modalities(["image", "text"])
    return source.to(device), target.to(device), dataset


def encode(expert: Expert, rows: list) -> torch.Tensor:
    """The expert's default layer for ``rows``, collated on the host and moved to the expert's device."""
    return expert.encode({k: v.to(expert.device) for k, v in expert.collate(rows).items()})[expert.layers[0]]


def reference_step(pair: str, source, target, dataset, step, batch_size: int, generator: torch.Generator):
    """One net2net-style step: draw items, run both experts on them (rendering BigGAN's images), train."""
    def run() -> None:
        index = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        items = [dataset[i] for i in index]
        with torch.inference_mode():
            c = encode(source, [source.rows(item)[0] for item in items])  # one caption per item, as net2net draws
            x = encode(target, [row for item in items for row in target.rows(item)])
            if pair == "bert_biggan":
                for chunk in x.split(RENDER_CHUNK):
                    target.decode(chunk)
        step(x.clone(), c.clone())

    return run


def n2n_step(pair: str, step, batch_size: int, device: torch.device, images: int = 20_000):
    """n2n-train's step: a batch drawn from a view's rows on ``device`` as the trainer draws it (float16
    latents, five captions joined onto each image, gathered and standardised per batch), then train."""
    source_dim, target_dim = PAIRS[pair]["dims"]
    norms = [Standardizer(torch.zeros(d), torch.ones(d)) for d in (source_dim, target_dim)]
    source = Rows(torch.randn(5 * images, source_dim).half(), torch.arange(5 * images), norms[0])
    target = Rows(torch.randn(images, target_dim).half(), torch.arange(images).repeat_interleave(5), norms[1])
    data = PairedLatents(view=None, source=source, target=target, held_source=source, held_target=target,
                         source_norm=norms[0], target_norm=norms[1]).to(device)  # held-out rows: unused
    generator = torch.Generator(device).manual_seed(0)

    def run() -> None:
        step(*data.batch(batch_size, generator))

    return run


def measure(pair: str, way: str, batch_size: int, steps: int, device: torch.device | str = "cpu",
            tiny: bool = False) -> dict:
    """Steps/s and peak memory of one way on ``device`` (run in a fresh process: see main)."""
    device = torch.device(device)
    torch.manual_seed(0)
    source_dim, target_dim = PAIRS[pair]["dims"]
    flow = ConditionalFlow(target_dim, source_dim, FlowConfig(**flow_spec(pair, tiny))).to(device)
    flow.train()
    x, c = torch.randn(batch_size, target_dim, device=device), torch.randn(batch_size, source_dim, device=device)
    flow(x, c)  # ActNorm init
    step = trainer_step(flow)
    with tempfile.TemporaryDirectory(prefix="n2n-bench-") as tmp:
        if way == "reference":
            experts = build_experts(pair, Path(tmp), device, tiny)
            generator = torch.Generator().manual_seed(0)  # draws the items, on the host
            run = reference_step(pair, *experts, step, batch_size, generator)
            reference_step(pair, *experts, step, 8, generator)()  # warm-up at a small batch: the cost is per item
        else:
            run = n2n_step(pair, step, batch_size, device)
            run()
        times = timed(run, steps, sync=device.type == "cuda")
    gpu = {"peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {}
    return {"step_s": times, "steps_per_s": len(times) / sum(times), "peak_rss_mib": peak_rss_mib(), **gpu}


def flow_spec(pair: str, tiny: bool) -> dict:
    """The pair's cINN settings (at TINY_FLOWS blocks where ``tiny``)."""
    return {**PAIRS[pair]["flow"], **({"n_flows": TINY_FLOWS} if tiny else {})}


@click.command()
@DEVICE_OPTION
@click.option("--pair", "pairs", multiple=True, type=click.Choice(list(PAIRS)), default=tuple(PAIRS),
              show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--n2n-steps", default=5, show_default=True, help="Timed n2n steps (after one warm-up).")
@click.option("--ref-steps", type=int, default=None, help="Timed reference steps [default: per pair, 1 or 3].")
@click.option("--tiny", is_flag=True, help="BigGAN and the cINN at test size: a smoke run, not a measurement.")
@click.option("--way", type=click.Choice(["reference", "n2n"]), default=None, hidden=True)
def main(device: torch.device, pairs: tuple[str, ...], batch_size: int, n2n_steps: int, ref_steps: int | None,
         tiny: bool, way: str | None) -> None:
    if way:  # a child process: measure one way of one pair, print JSON
        steps = n2n_steps if way == "n2n" else (ref_steps or PAIRS[pairs[0]]["ref_steps"])
        print(json.dumps(measure(pairs[0], way, batch_size, steps, device, tiny)))
        return
    rows, raw = [], {}
    memory, memory_name = MEMORY[device.type]
    for pair in pairs:
        for w in ("n2n", "reference"):
            args = [sys.executable, "-m", "bench.reference", "--device", str(device), "--pair", pair, "--way", w,
                    "--batch-size", str(batch_size), "--n2n-steps", str(n2n_steps)]
            args += (["--ref-steps", str(ref_steps)] if ref_steps else []) + ["--tiny"] * tiny
            done = subprocess.run(args, stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT)  # errors: to stderr
            raw[f"{pair}/{w}"] = json.loads(done.stdout.strip().splitlines()[-1])
        ours, ref = raw[f"{pair}/n2n"], raw[f"{pair}/reference"]
        ratio = ours["steps_per_s"] / ref["steps_per_s"]
        target = TARGET.get(pair)
        rows.append(Row(f"{pair}: training steps/s on {device.type}, from shards vs experts in every step",
                        f"{ours['steps_per_s']:.3f}/s", f"{ref['steps_per_s']:.4f}/s", ratio,
                        f">= {target:.0f}x" if target else "", ratio >= target if target else None))
        rows.append(Row(f"{pair}: {memory_name} of the training process", f"{ours[memory]:.0f} MiB",
                        f"{ref[memory]:.0f} MiB", ref[memory] / ours[memory]))
    report("reference" if device.type == "cpu" else f"reference-{device.type}",
           {"device": str(device), "pairs": list(pairs), "batch_size": batch_size, "n2n_steps": n2n_steps,
            "ref_steps": ref_steps, "tiny": tiny, "flows": {p: flow_spec(p, tiny) for p in pairs}}, rows, raw)


if __name__ == "__main__":
    main()
