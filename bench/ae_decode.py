"""The autoencoder expert's upsampling: n2n's ``Upsample2x`` (a broadcast and a reshape) against torch's
``nn.Upsample(scale_factor=2)`` (nearest), in the demo's autoencoder (random weights: timing needs no
trained ones), on the CPU. Both give the same values (tests/test_experts.py); the ratio is torch's time
over n2n's. Decoding in batches of 1024 is what n2n-eval does with the shapes judge's samples; a
training step at batch 32 is n2n-train-ae's.
Run: python -m bench.ae_decode [--repeat 5]
"""

from __future__ import annotations

import click
import torch
from torch import nn

from bench.common import Row, interleaved, report
from n2n.extract.experts.ae import ConvAutoencoder, Upsample2x

DEMO = {"image_size": 64, "channels": (16, 32, 64, 128), "latent_dim": 32, "variational": True}  # n2n-train-ae's


def with_upsampling(model: ConvAutoencoder, make: type[nn.Module]) -> ConvAutoencoder:
    """``model`` with every upsampling of its decoder replaced by ``make()`` (in place; no parameters)."""
    for block in model.decoder:
        if isinstance(block, nn.Sequential) and isinstance(block[0], (nn.Upsample, Upsample2x)):
            block[0] = make()
    return model


def torch_upsample() -> nn.Module:
    return nn.Upsample(scale_factor=2)


@click.command()
@click.option("--repeat", default=5, show_default=True, help="Timed calls of each, interleaved.")
@click.option("--decode-batch", default=1024, show_default=True)
@click.option("--train-batch", default=32, show_default=True)
def main(repeat: int, decode_batch: int, train_batch: int) -> None:
    torch.manual_seed(0)
    ours, theirs = ConvAutoencoder(**DEMO), with_upsampling(ConvAutoencoder(**DEMO), torch_upsample)
    theirs.load_state_dict(ours.state_dict())
    z, x = torch.randn(decode_batch, DEMO["latent_dim"]), torch.rand(train_batch, 3, 64, 64)

    def decode(model: ConvAutoencoder):
        @torch.no_grad()
        def run() -> torch.Tensor:
            return model.eval().decode(z)
        return run

    def step(model: ConvAutoencoder):
        def run() -> None:
            reconstruction, kl = model.train()(x)
            (reconstruction.mean() + kl.mean()).backward()
        return run

    rows, raw = [], {}
    for name, ours_call, theirs_call, batch in (("decode", decode(ours), decode(theirs), decode_batch),
                                                ("train step", step(ours), step(theirs), train_batch)):
        times = interleaved({"n2n": ours_call, "torch": theirs_call}, repeat)
        a, b = min(times["n2n"]), min(times["torch"])
        raw[name] = times
        rows.append(Row(f"demo autoencoder {name}, batch {batch}: Upsample2x vs nn.Upsample (best of {repeat})",
                        f"{a * 1000:.0f} ms", f"{b * 1000:.0f} ms", b / a, "> 1x (a speed-up)", b / a > 1))
    report("ae_decode", {"repeat": repeat, "decode_batch": decode_batch, "train_batch": train_batch, **DEMO}, rows,
           raw)


if __name__ == "__main__":
    main()
