"""``n2n.train(view, ...)``: fit a cINN on a view, or go on with a run; n2n-train is a thin wrapper.

Everything a run is given is settled here, before any work starts: the options (``TrainConfig``
and ``FlowConfig`` fields, each checked against its range), which view and which run folder, and on
``resume`` that the options agree with the checkpoint's. Then ``trainer.fit`` trains, on every rank
under torchrun.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch import nn

from n2n.cinn import FlowConfig, build_flow
from n2n.cinn.flow import first_stage
from n2n.cinn.translators import SHRINK, parameter_parts
from n2n.options import check_value, flag, load_options, split_options
from n2n.parallel import Ranks, pick_device
from n2n.shards import as_path
from n2n.shards.lock import hold
from n2n.shards.view import View, open_view
from n2n.train.checkpoint import CHECKPOINT, CheckpointError, read_meta, run_view
from n2n.train.data import split_pairs
from n2n.train.sizing import sized
from n2n.train.trainer import ON_RESUME, TrainConfig, TrainError, check_fits, fit, out_of_memory, saved_settings


def settings(**options: Any) -> tuple[TrainConfig, FlowConfig]:
    """Keyword options as the run's two configs, each checked: an unknown name or a value out of its
    range is an N2NError naming the option (n2n-train checks its options here before anything runs)."""
    train, flow = split_options(options, TrainConfig, FlowConfig)
    return TrainConfig(**train), FlowConfig(**flow)


# train()'s own options beside the configs' (a config file's keys too), with their defaults
RUN_OPTIONS = {"shards": None, "out": None, "resume": False, "device": "auto", "compile": None, "stream": None,
               "init_from": None, "source_dim": None, "target_dim": None}


def train(view: View | str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
          config: str | os.PathLike | None = None, resume: bool = False, device: str = "auto",
          compile: bool | None = None, stream: bool | None = None, init_from: str | os.PathLike | None = None,
          source_dim: int | None = None, target_dim: int | None = None, progress: bool = True,
          console: Console | None = None, **options: Any) -> Path:
    """Train a cINN p(target latent | source latent) on ``view`` (a View, its folder or its URL) into
    the run folder ``out`` (default ``runs/<view name>``) and return that folder.

    ``options`` are n2n-train's options: ``TrainConfig``'s fields (``steps``, ``batch_size``, ``lr``,
    ``holdout``, ``target_noise``, ...) and ``FlowConfig``'s (``n_flows``, ``hidden_dim``, ...).
    ``config``: a YAML file of the same options (and ``shards``, ``out``, ``device``, ...), as n2n-train's
    ``--config`` reads it; keyword arguments override it (``train(config="runs/x/config.yaml",
    out="runs/y")`` trains run x again). The run writes its resolved options to ``out/config.yaml``.
    A config may also be net2net's own translation YAML (``configs/translation/sbert-to-biggan256.yaml``):
    its flow, batch size and learning rate, and the latent sizes the view must have (``source_dim``,
    ``target_dim``). ``init_from``: a net2net checkpoint (``.ckpt`` or its state dict) whose flow the
    new run starts from (``n2n.cinn.from_net2net``).
    ``resume`` goes on with the checkpoint in ``out`` up to ``steps``, with the settings it was
    trained with (giving another value for one of them is an error; ``view`` defaults to the run's
    own), and ends with the weights an uninterrupted run would have. ``stream=None`` streams the
    training pairs from the stores only where the view would not fit on the device; ``compile=None``
    compiles the loss on CUDA only (n2n-train --help has the CPU measurement). ``progress=False``
    prints no progress and no summary, only warnings. Under torchrun every rank trains its slice of
    each global batch. Errors are ``N2NError``s; ``DivergedError`` when the loss turns NaN/inf.
    """
    given = {"shards": view, "out": out, "resume": resume or None, "device": None if device == "auto" else device,
             "compile": compile, "stream": stream, "init_from": init_from, "source_dim": source_dim,
             "target_dim": target_dim, **options}
    run, (train_options, flow_options) = load_options(config, given, TrainConfig, FlowConfig, own=RUN_OPTIONS)
    view, out, resume, device = run["shards"], run["out"], run["resume"], run["device"]
    compile, stream, init_from, source_dim, target_dim = (run[name] for name in ("compile", "stream", "init_from",
                                                                                  "source_dim", "target_dim"))
    for name, value in (("source_dim", source_dim), ("target_dim", target_dim)):
        check_value(name, value, integer=True, min=1, optional=True)
    cfg, flow_config = TrainConfig(**train_options), FlowConfig(**flow_options)
    options = {**train_options, **flow_options}  # the settings given, which a resume checks against its own
    view_path = None if view is None else view.path if isinstance(view, View) else as_path(view)
    if view_path is None and not (resume and out is not None):
        raise TrainError("no view to train on: give one (--shards), or a run folder to --resume (--out)")
    out = Path(out) if out is not None else Path("runs") / view_path.name
    checkpoint = out / CHECKPOINT
    ranks = Ranks.from_env()
    console = console if console and ranks.main else Console(stderr=True, quiet=not ranks.main)  # one voice
    if resume:
        cfg, flow_config, view_path, step = resumed(out, view_path, cfg, flow_config, set(options))
        if step >= cfg.steps:  # a rerun of a finished run (make demo): nothing to load
            if progress:
                console.print(f"{out} is already at step {step}: nothing to train (a larger --steps goes on)")
            return out
    elif checkpoint.exists():
        raise TrainError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    check_dims(view_path, source_dim, target_dim)
    check_law(view_path, flow_config)
    if init_from is not None and resume:
        raise TrainError(f"--init-from {init_from} starts a new run; --resume goes on with {out}'s own weights: "
                         "give one of them")
    resolved = {"shards": view_path, "out": out, **dataclasses.asdict(cfg), **dataclasses.asdict(flow_config),
                "device": device, "compile": compile, "stream": stream, "init_from": init_from}
    summary = fit_locked(view_path, out, cfg, flow_config, ranks, device, resume=resume, compile=compile,
                         stream=stream, progress=progress, console=console, config=resolved, init_from=init_from)
    if progress and ranks.main:
        print_summary(summary, console)
    return out


def resumed(out: Path, view_path: Path | None, cfg: TrainConfig, flow_config: FlowConfig,
            given: set[str]) -> tuple[TrainConfig, FlowConfig, Path, int]:
    """What ``--resume`` of the run in ``out`` goes on with: its own settings (``resumed_settings``), its view
    (``view_path`` where given, checked to fit), and the step it is at."""
    checkpoint = out / CHECKPOINT
    if not checkpoint.exists():
        raise CheckpointError(f"--resume: no checkpoint in {out}; drop --resume to start this run")
    meta = read_meta(checkpoint)
    cfg, flow_config = resumed_settings(meta, cfg, flow_config, given, checkpoint)
    if view_path is None:
        view_path = run_view(meta, out)
    else:
        check_fits(meta, view_path, checkpoint)
    return cfg, flow_config, view_path, meta["step"]


def fit_locked(view_path: Path, out: Path, cfg: TrainConfig, flow_config: FlowConfig, ranks: Ranks, device: str,
               **fit_options: Any) -> dict:
    """``fit`` on ``device`` with the run folder's lock held (rank 0 alone writes it) and the process group
    joined under torchrun, both released however it ends; running out of memory is a TrainError."""
    dev = device_of(device, ranks)
    lock = hold(out, "trained") if ranks.main else None  # one run per folder
    joined = ranks.init("nccl" if dev.type == "cuda" else "gloo")
    try:
        return fit(view_path, out, cfg, flow_config, dev=dev, ranks=ranks, **fit_options)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not out_of_memory(err):
            raise
        raise TrainError(out_of_memory_message(dev, view_path, cfg, flow_config)) from err
    finally:
        if joined:
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


def out_of_memory_message(dev: torch.device, view: Path, cfg: TrainConfig, flow_config: FlowConfig) -> str:
    """What n2n-train says when the device runs out of memory: the translator's largest part and the options that
    shrink it (``parameter_parts``), and --batch-size for the activations."""
    part, count = next(iter(parts_of(view, cfg, flow_config)[0].items()))
    return (f"out of memory on {dev} training this translator: its largest part is the {part} ({count:,} "
            f"parameters; {SHRINK.get(part, 'a smaller size')} shrinks it), and --batch-size shrinks the "
            "activations; n2n-train --dry-run shows every part")


def parts_of(view: Path, cfg: TrainConfig,
             flow_config: FlowConfig) -> tuple[dict[str, int], nn.Module, np.ndarray]:
    """The parameters by part of the translator ``train`` builds on ``view`` (sized to its train pairs, built on
    the meta device: nothing allocated), the translator, and the view's held-out mask."""
    v, _, held = split_pairs(view, cfg.holdout)
    flow_config, _ = sized(flow_config, v.target.dim, v.source.dim, int((~held).sum()))
    with torch.device("meta"):  # shapes only: sizing a billion-parameter flow allocates nothing
        flow = build_flow(v.target.dim, v.source.dim, flow_config)
    return parameter_parts(flow), flow, held


def check_law(view: Path, flow_config: FlowConfig) -> None:
    """The first stage ``flow_config`` asks for fits the view's target (``cinn.flow.first_stage``: ``--base mlp``
    has a full covariance, refused where the target gets the low-rank law), checked on the meta device before
    anything is written."""
    v = open_view(view)
    try:
        with torch.device("meta"):
            first_stage(v.target.dim, v.source.dim, flow_config)
    except ValueError as err:
        raise TrainError(f"view {view}: {err}") from None


def check_dims(view: Path, source_dim: int | None, target_dim: int | None) -> None:
    """The view's latent sizes are those a config was written for (a net2net config names them)."""
    if source_dim is None and target_dim is None:
        return
    v = open_view(view)
    if (source_dim or v.source.dim, target_dim or v.target.dim) != (v.source.dim, v.target.dim):
        raise TrainError(f"the config is for {source_dim or '?'} -> {target_dim or '?'} dim latents, but view {view} "
                         f"joins {v.source.dim} -> {v.target.dim}: pair stores of the config's sizes, or drop "
                         "source_dim / target_dim")


def resumed_settings(meta: dict, cfg: TrainConfig, flow_config: FlowConfig, given: set[str],
                     checkpoint: Path) -> tuple[TrainConfig, FlowConfig]:
    """The settings ``checkpoint`` was trained with, less those of ``ON_RESUME`` that were given.
    Any other option given with a value other than the checkpoint's is refused, each named."""
    saved_train, saved_flow = saved_settings(meta)
    ours = dataclasses.asdict(cfg) | dataclasses.asdict(flow_config)  # checked and normalised
    saved = dataclasses.asdict(saved_train) | dataclasses.asdict(saved_flow)
    clash = [f"{flag(name)} {ours[name]} (checkpoint: {saved[name]})"
             for name in sorted(given) if name not in ON_RESUME and ours[name] != saved[name]]
    if clash:
        raise TrainError(f"--resume of {checkpoint.parent} keeps the settings it was trained with; "
                         f"drop {', '.join(clash)}")
    return dataclasses.replace(saved_train, **{name: ours[name] for name in ON_RESUME if name in given}), saved_flow


def device_of(name: str, ranks: Ranks) -> torch.device:
    """``pick_device`` with a misspelt name as a TrainError, not torch's traceback."""
    try:
        return pick_device(name, ranks.local, TrainError)
    except RuntimeError as e:
        raise TrainError(f"--device {name!r}: not a device ({e}); use auto, cpu, cuda or cuda:N") from None


def dry_run(view: View | str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
            **options: Any) -> dict[str, Any]:
    """What ``train(view, **options)`` would build, without training (n2n-train --dry-run): the
    flow's settings and parameter count, the batch size, the learning rate and the number of pairs."""
    run, (train_options, flow_options) = load_options(config, {"shards": view, **options}, TrainConfig, FlowConfig,
                                                      own=RUN_OPTIONS)
    view = run["shards"]
    cfg, flow_config = TrainConfig(**train_options), FlowConfig(**flow_options)
    if view is None:
        raise TrainError("--dry-run sizes a run on a view: give one (--shards)")
    parts, flow, held = parts_of(view.path if isinstance(view, View) else view, cfg, flow_config)
    return {**flow.to_dict(), "batch_size": cfg.batch_size, "lr": cfg.learning_rate,
            "parameters": sum(parts.values()), "parts": parts, "pairs": len(held), "train_pairs": int((~held).sum())}


def print_summary(summary: dict, console: Console) -> None:
    """The end of a run as a table: steps, time, NLLs, the analytic NLL of a synthetic view."""
    table = Table(title=f"n2n-train: {summary['run']}", show_header=False)
    table.add_row("steps", str(summary["step"]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    if "train_bpd" in summary:
        table.add_row("train NLL", f"{summary['train_bpd']:.4f} bits/dim")
    else:
        table.add_row("train loss (flow matching)", f"{summary['train_loss']:.4f}")
    if summary["heldout_bpd"] is not None:
        table.add_row("held-out NLL", f"{summary['heldout_bpd']:.4f} bits/dim (last, step {summary['step']})")
    if summary.get("best") is not None:
        best = summary["best"]
        table.add_row("best held-out NLL", f"{best['heldout_bpd']:.4f} bits/dim (step {best['step']}: "
                                           f"{Path(best['checkpoint']).name}, what the run's readers load)")
    if summary.get("linear_gaussian_bpd") is not None:
        table.add_row("linear-Gaussian floor", f"{summary['linear_gaussian_bpd']:.4f} bits/dim")
    if "truth_bpd" in summary:
        table.add_row("analytic NLL", f"{summary['truth_bpd']:.4f} bits/dim")
        table.add_row("gap", f"{summary['gap_nats_per_dim']:+.4f} nats/dim")
    table.add_row("checkpoint", f"{summary['checkpoint']} (last: --resume continues it)")
    console.print(table)
