"""n2n-train: fit a cINN on a view of two latent stores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from n2n.cinn import ConditionalFlow
from n2n.parallel import Ranks, relaunch
from n2n.shards.cli import PATH_OR_URL
from n2n.shards.store import StoreError
from n2n.shards.view import open_view
from n2n.train.checkpoint import CHECKPOINT, CheckpointError, read_meta
from n2n.train.trainer import DivergedError, ModelConfig, TrainConfig, TrainError, train

console = Console(stderr=True)
# Options that shape the run; on --resume they come from the checkpoint and may not be changed.
FIXED_ON_RESUME = ("batch_size", "lr", "seed", "holdout", "target_noise", "n_flows", "hidden_dim", "hidden_depth",
                   "embedding_dim", "embedder_norm")


def fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def conflicts_with_checkpoint(ctx: click.Context, out: Path) -> list[str]:
    """Options given on the command line that differ from what the checkpoint was trained with."""
    meta = read_meta(out / CHECKPOINT)
    saved = {**meta["train"], **meta["train"]["model"]}
    explicit = [
        name for name in FIXED_ON_RESUME
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        and ctx.params[name] != saved.get(name)
    ]
    return [f"--{n.replace('_', '-')} {ctx.params[n]} (checkpoint: {saved.get(n)})" for n in explicit]


def print_dry_run(view: Path, model: ModelConfig, cfg: TrainConfig) -> None:
    v = open_view(view)
    flow = ConditionalFlow(dim=v.target.dim, cond_dim=v.source.dim, **vars(model))
    params = sum(p.numel() for p in flow.parameters())
    table = Table(title=f"n2n-train --dry-run {view}", show_header=False)
    for key, value in {**flow.config, "batch_size": cfg.batch_size, "lr": f"{cfg.learning_rate:.3g}"}.items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{params:,}")
    table.add_row("weights + Adam state (fp32)", f"{params * 4 * 4 / 2**20:,.0f} MiB")
    table.add_row("pairs", f"{len(v.join().key):,}")
    Console().print(table)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--shards", "view", required=True, type=PATH_OR_URL,
              help="View folder (holds view.json) naming the source and target stores, e.g. shards/minilm_ae.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder for checkpoint.safetensors and metrics.jsonl.  [default: runs/<view name>]")
@click.option("--steps", default=TrainConfig.steps, help="Total optimizer steps (on --resume: the new total).")
@click.option("--batch-size", default=TrainConfig.batch_size)
@click.option("--lr", type=float, default=None, help="Adam learning rate.  [default: 4.5e-6 x batch size, as net2net]")
@click.option("--n-flows", default=ModelConfig.n_flows, help="Blocks of [ActNorm, double coupling, shuffle].")
@click.option("--hidden-dim", default=ModelConfig.hidden_dim, help="Width of the coupling nets.")
@click.option("--hidden-depth", default=ModelConfig.hidden_depth, help="Hidden layers of the coupling nets.")
@click.option("--embedding-dim", type=int, default=None,
              help="Condition embedding size.  [default: max(target dim, 64)]")
@click.option("--embedder-norm", type=click.Choice(["layer", "batch", "none"]), default="layer",
              help="Normalisation in the condition embedder (net2net: batch; breaks at batch size 1).")
@click.option("--target-noise", default=TrainConfig.target_noise,
              help="Gaussian noise (standardised units) on training targets: dequantises targets that are "
                   "point masses given their source (e.g. 0.05 for a renderer's latents).")
@click.option("--holdout", default=TrainConfig.holdout, help="Fraction of keys held out (by key hash) for evaluation.")
@click.option("--eval-every", default=TrainConfig.eval_every,
              help="Steps between held-out evaluations and checkpoints.")
@click.option("--seed", default=TrainConfig.seed)
@click.option("--device", default="auto", help="auto | cpu | cuda | cuda:N")
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the loss; falls back to eager if compiling fails.  [default: on CUDA only: "
                   "on a CPU compiling took ~75 s for +16% steps/s, a loss for runs under ~50k steps]")
@click.option("--stream/--no-stream", default=None,
              help="Read training pairs from the stores window by window (shuffled across files, read ahead in "
                   "the background) instead of loading the view on the device.  [default: only where it would "
                   "not fit]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint, exactly.")
@click.option("--dry-run", is_flag=True, help="Build the model, print its size and the pair count, train nothing.")
@click.option("--nproc", default=1, type=click.IntRange(min=1),
              help="Data-parallel processes on this node (one per GPU): relaunches this command under torchrun. "
                   "--batch-size stays the global batch; many nodes: see the README.")
@click.pass_context
def main(ctx: click.Context, view: Path, out: Path | None, steps: int, batch_size: int, lr: float | None,
         n_flows: int, hidden_dim: int, hidden_depth: int, embedding_dim: int | None, embedder_norm: str,
         target_noise: float, holdout: float, eval_every: int, seed: int, device: str, compile: bool | None,
         stream: bool | None, resume: bool, dry_run: bool, nproc: int) -> None:
    """Train a conditional INN p(target latent | source latent) from a view's stores alone.

    Both sides are standardised (statistics kept in the checkpoint); keys hashing into --holdout are
    held out and reported as NLL in bits/dim of the target latent. Ctrl-C keeps the last checkpoint;
    --resume continues it and ends with the weights an uninterrupted run would have.

    Example: n2n-train --shards shards/synth-gaussian --steps 2000 --n-flows 8 --hidden-dim 128

    Several GPUs: n2n-train --nproc 8 ... (or torchrun --nproc-per-node 8 -m n2n.train ...): DDP, each
    process a slice of every global batch, so the run is the one-process run's; --resume works with
    any process count.
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(relaunch(nproc, "n2n.train", sys.argv[1:]))
    model = ModelConfig(n_flows=n_flows, hidden_dim=hidden_dim, hidden_depth=hidden_depth,
                        embedding_dim=embedding_dim, embedder_norm=embedder_norm)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, holdout=holdout,
                      target_noise=target_noise,
                      eval_every=eval_every, log_every=min(50, eval_every), model=model)
    out = out or Path("runs") / view.name
    try:
        if dry_run:
            print_dry_run(view, model, cfg)
            return
        if resume and (out / CHECKPOINT).exists():
            clash = conflicts_with_checkpoint(ctx, out)
            if clash:
                fail(f"--resume of {out} keeps the settings it was trained with; drop {', '.join(clash)}")
        summary = train(view, out, cfg, device=device, compile=compile, resume=resume, stream=stream,
                        console=console)
    except (StoreError, CheckpointError, TrainError) as e:
        fail(str(e), code=1 if isinstance(e, DivergedError) else 2)
    if not Ranks.from_env().main:
        return
    if summary["train_bpd"] is None:  # a --resume of a run that already reached --steps
        console.print(f"{out} is already at step {summary['step']}: nothing to train (a larger --steps goes on)",
                      highlight=False, soft_wrap=True)
        return
    table = Table(title=f"n2n-train: {summary['run']}", show_header=False)
    table.add_row("steps", str(summary["step"]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("train NLL", f"{summary['train_bpd']:.4f} bits/dim")
    if summary["heldout_bpd"] is not None:
        table.add_row("held-out NLL", f"{summary['heldout_bpd']:.4f} bits/dim")
    if "truth_bpd" in summary:
        table.add_row("analytic NLL", f"{summary['truth_bpd']:.4f} bits/dim")
        table.add_row("gap", f"{summary['gap_nats_per_dim']:+.4f} nats/dim")
    table.add_row("checkpoint", summary["checkpoint"])
    Console().print(table)
