"""Stage 2: fit the cINN p(target | source) from a view's latents alone.

Read top to bottom: settings, the loss, held-out evaluation, checkpoint contents, the loop.
The joined arrays live on the device; a batch is ``torch.randint`` + an index gather, so a step
costs the cINN's forward and backward and nothing else (no DataLoader, no per-sample Python).
A view too large for the device is streamed from its stores instead (train.stream); both are
``Pairs`` to the loop.

Under torchrun the run is data-parallel (DDP): every rank holds the view on its own device and
draws the same global batch indices from the same generator, then keeps its own slice of them.
So the global batch, the noise and the trajectory are those of one process with the same
--batch-size, whatever the number of processes, and a run resumes with any other number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel

from n2n.cinn import ConditionalFlow, ContinuousFlow, FlowConfig, bits_per_dim, build_flow
from n2n.cinn.flow import PairedMLP, upgrade_header
from n2n.cinn.gaussian import GaussianLaw
from n2n.cinn.lowrank_gaussian import LowRankGaussian
from n2n.cinn.mlp_gaussian import MLPGaussian
from n2n.errors import N2NError
from n2n.options import CONFIG_FILE, check_fields, config_text, setting
from n2n.parallel import Ranks
from n2n.shards import write_text_atomic
from n2n.shards.view import open_view
from n2n.train.checkpoint import (
    BEST,
    CHECKPOINT,
    load_checkpoint,
    model_tensors,
    optimizer_tensors,
    prefixed,
    restore_optimizer,
    save_checkpoint,
    saved_norms,
    view_record,
)
from n2n.train.data import Pairs, Standardizer, load_pairs
from n2n.train.heap import activation_bytes, heap_for
from n2n.train.heldout import (
    FLOOR_ROWS,
    LAW_FILE,
    fit_law,
    floor_bpd,
    heldout_bpd,
    law_record,
    linear_gaussian_bpd,
    save_law,
)
from n2n.train.loggers import LOGGERS, Logger, open_logger
from n2n.train.plots import plot_loss
from n2n.train.samples import SampleGrid, sample_grid
from n2n.train.sizing import sized
from n2n.train.stream import stream_pairs

NET2NET_BASE_LR = 4.5e-6  # net2net scales its learning rate by the batch size
LOSS_PLOT = "loss.png"  # redrawn in the run folder at checkpoints
Flow = ConditionalFlow | ContinuousFlow  # the translator kinds (cinn.translators)
MEMORISING_BITS = 0.1  # held-out NLL above the floor and the best by this much: warn_if_memorising speaks
PLOT_SHARE = 0.1  # of a run's time, at most, for its loss plot: a redraw waits 1 / PLOT_SHARE times the last one's cost


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a run trains (the flow's shape is ``FlowConfig``); each field is an n2n-train option."""

    steps: int = setting(10_000, "Total optimizer steps (on --resume: the new total).", min=1)
    batch_size: int = setting(256, "Pairs per step; under torchrun the global batch, split over the processes.",
                              min=1)
    lr: float | None = setting(None, "Adam learning rate.  [default: 4.5e-6 x batch size, as net2net]", above=0)
    seed: int = setting(0, "Seed of the initial weights, the batches and the target noise.", min=0)
    holdout: float = setting(0.05, "Fraction of keys held out (by key hash) for evaluation.", min=0, below=1)
    eval_every: int = setting(500, "Steps between held-out evaluations and checkpoints.", min=1)
    log_every: int = setting(50, "Steps between training-loss lines in metrics.jsonl (never more than --eval-every).",
                             min=1)
    eval_rows: int = setting(16_384, "Held-out pairs per evaluation (the first ones, always the same).", min=1)
    # A target that is a point mass given its condition (a renderer's one image per caption) has no
    # density for a flow to fit; noise dequantises it, as uniform noise does for pixels in image flows.
    target_noise: float = setting(
        0.0, "Gaussian noise (standardised units) on training targets: dequantises targets that are point masses "
             "given their source (e.g. 0.05 for a renderer's latents). Held-out NLL stays clean.", min=0)

    logger: str = setting("tensorboard", "Where the curves go beside metrics.jsonl: tensorboard (event files in the "
                                         "run folder: tensorboard --logdir runs), wandb (pip install 'n2n[wandb]'), "
                                         "csv (metrics.csv) or none.", choices=LOGGERS)
    log_images: int = setting(8, "Held-out sources whose samples the logger shows, decoded, at every checkpoint "
                                 "(where the target expert decodes; 0: none).", min=0)
    # Measured (train.heap, bench.target_dims): a coupling step at 65,536 target dims and batch 256 took 9.8 s
    # with each large activation mapped afresh (glibc's default), 3.9 s from the heap, at a peak of 12.4 GiB
    # against 9.4; narrower steps' activations are under 32 MiB and reused by glibc anyway.
    heap: bool = setting(True, "On a CPU under glibc, serve a step's activations of 32 MiB or more (batch x target "
                               "dims x 4 bytes) from the heap while training instead of mapping each afresh: 2.5x "
                               "faster steps at 65,536 target dims, ~30% more resident memory. Off: glibc's default.")

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else NET2NET_BASE_LR * self.batch_size


# Settings a resumed run may change: how long it runs, what it reports and how it allocates, not its trajectory.
ON_RESUME = ("steps", "eval_every", "log_every", "eval_rows", "logger", "log_images", "heap")


class TrainError(N2NError):
    """Bad input for a run; the message names what and how to go on."""


class DivergedError(TrainError):
    """The loss or the weights became NaN/inf; the last good checkpoint is kept. Exit status 1: the
    input was fine, the run was not."""

    exit_code = 1


FAN_IN = 4096  # layers reading more inputs than this learn at lr x FAN_IN / fan-in (make_optimizer says why)


def fan_ins(flow: torch.nn.Module) -> dict[int, int]:
    """The number of inputs of every weight matrix of ``flow``'s layers, by the parameter's id."""
    found = {}
    for module in flow.modules():
        if isinstance(module, torch.nn.Linear):
            found[id(module.weight)] = module.in_features
        elif isinstance(module, PairedMLP):
            found |= {id(weight): weight.shape[1] for weight in module.weights}  # [2, in, out]
    return found


def make_optimizer(flow: Flow, lr: float) -> torch.optim.Optimizer:
    """net2net's Adam(betas=(0.5, 0.9), amsgrad) over the trained parameters (a continuous translator's
    linear-Gaussian stage is fixed); fused kernels where this torch has them.

    A layer with more than FAN_IN inputs learns at lr x FAN_IN / fan-in (muP's rule for Adam). Why: Adam moves
    every weight by about lr in its first steps, all at once, so a layer's outputs move by about lr x fan-in.
    A 65,536-dim target's coupling nets read 32,768 inputs: at net2net's rate the NLL went from 3.8e4 nats to
    9e12 in five steps (measured). Scaled, a wide layer's step is what it is at FAN_IN inputs; every layer of
    FAN_IN inputs or fewer (net2net's, the demo's) learns at lr as before, in one group."""
    widths = fan_ins(flow)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p in (p for p in flow.parameters() if p.requires_grad):
        groups.setdefault(lr * min(1.0, FAN_IN / widths.get(id(p), 1)), []).append(p)
    params = [{"params": group, "lr": rate} for rate, group in groups.items()]
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9), amsgrad=True, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9), amsgrad=True, foreach=True)


class Objective(torch.nn.Module):
    """The translator's training loss as a module's forward: what DDP wraps, so that its gradient hooks see
    the one call a step makes, whichever kind of translator computes it."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor, c: torch.Tensor, *drawn: torch.Tensor) -> torch.Tensor:
        return self.flow.loss(x, c, *drawn)


def make_loss(model: Objective | torch.nn.Module, compile: bool, console: Console) -> Callable:
    """The translator's loss on standardised pairs (its own ``loss``: the mean NLL in nats for the coupling
    flow, flow matching's error for the continuous one), compiled when asked, eager if compiling fails.
    ``model``: an ``Objective``, or one under DDP."""

    def loss(x: torch.Tensor, c: torch.Tensor, *drawn: torch.Tensor) -> torch.Tensor:
        return model(x, c, *drawn)

    if not compile:
        return loss
    compiled = torch.compile(loss)
    current = [compiled]

    def guarded(x: torch.Tensor, c: torch.Tensor, *drawn: torch.Tensor) -> torch.Tensor:
        try:
            return current[0](x, c, *drawn)
        except Exception as e:  # inductor needs a C++/triton toolchain; training must not depend on it
            if current[0] is loss:
                raise
            console.print(f"[yellow]warning: torch.compile failed ({type(e).__name__}: {e}); training eagerly")
            current[0] = loss
            return loss(x, c, *drawn)

    return guarded


def make_step(loss_fn: Callable, optimizer: torch.optim.Optimizer) -> Callable:
    """One optimiser step on (x, c) and the loss's random inputs; returns the loss, left on the device (no
    host sync per step)."""

    def step(x: torch.Tensor, c: torch.Tensor, *drawn: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(x, c, *drawn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the device running out of memory: CUDA's OutOfMemoryError, or the CPU
    allocator's RuntimeError, which torch gives no class of its own."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def run_floor(data: Pairs, cfg: TrainConfig, meta: dict, ranks: Ranks, console: Console,
              law: GaussianLaw | None = None) -> float | None:
    """The run's linear-Gaussian floor: its checkpoint's where one measured it on the same held-out
    rows (a resume stays as cheap as it was), else ``law``'s (the one the translator starts from), else
    measured now. Only the main process measures it: it is reported and saved, never trained on, and no
    collective waits on it. Out of memory for it is a warning, not a failed run."""
    if "linear_gaussian_bpd" in meta and meta["train"].get("eval_rows") == cfg.eval_rows:
        return meta["linear_gaussian_bpd"]
    if not ranks.main:
        return None
    if law is not None:
        return floor_bpd(law, data, cfg.eval_rows) if len(data.held_target) and cfg.eval_rows > 0 else None
    try:
        return linear_gaussian_bpd(data, cfg.eval_rows, noise=cfg.target_noise)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not out_of_memory(err):
            raise
        console.print(f"[yellow]warning: out of memory fitting the linear-Gaussian floor on {FLOOR_ROWS} pairs; "
                      "training without it")
        return None


def describe_law(law: GaussianLaw | None, data: Pairs, cfg: TrainConfig, ranks: Ranks) -> str | None:
    """What the law a new run starts from is, and where it is not the linear-Gaussian floor (an MLP mean), its own
    held-out NLL: the base a translator must clear, printed beside the floor."""
    if law is None:
        return None
    if not isinstance(law, MLPGaussian) or not ranks.main or not len(data.held_target) or cfg.eval_rows <= 0:
        return law.describe()
    return f"{law.describe()}; held-out NLL {floor_bpd(law, data, cfg.eval_rows):.4f} bits/dim"


def checkpoint_state(
    flow: Flow, optimizer: torch.optim.Optimizer, generator: torch.Generator,
    data: Pairs, cfg: TrainConfig, step: int, heldout: float | None, out: Path, floor: float | None = None,
    best: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint's tensors and header (train.checkpoint describes both)."""
    optim, optim_meta = optimizer_tensors(optimizer)
    tensors = {**model_tensors(flow, data.source_norm, data.target_norm), **optim, "rng.batch": generator.get_state()}
    meta = {
        "n2n_checkpoint": 1,
        "step": step,
        "model": flow.to_dict(),
        "train": dataclasses.asdict(cfg),
        "view": view_record(data.view.path, out),
        "source": data.view.source.identity(),
        "target": data.view.target.identity(),
        "optimizer": optim_meta,
        "heldout_bpd": heldout,
        "linear_gaussian_bpd": floor,  # linear_gaussian_bpd: the held-out NLL a flow must go below
        "best": best,  # {"step", "heldout_bpd"} of best.safetensors, the best held-out NLL so far
    }
    return tensors, meta


def saved_settings(meta: dict) -> tuple[TrainConfig, FlowConfig]:
    """The settings a checkpoint was trained with. Headers of earlier versions kept a copy of the
    flow's settings in ``train`` and lacked later fields (at their defaults here, the flow's at what
    those versions built)."""
    train = {f.name: meta["train"][f.name] for f in dataclasses.fields(TrainConfig) if f.name in meta["train"]}
    flow = {k: v for k, v in upgrade_header(meta["model"]).items() if k not in ("dim", "cond_dim")}
    return TrainConfig(**train), FlowConfig(**flow)


def check_fits(meta: dict, view: Path | str, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint on a view of other dimensions (cheap: reads only the stores' meta)."""
    v = open_view(view)
    model = meta["model"]
    if (model["cond_dim"], model["dim"]) != (v.source.dim, v.target.dim):
        raise TrainError(
            f"{checkpoint} was trained on {model['cond_dim']} -> {model['dim']} dims but {v.path} holds "
            f"{v.source.dim} -> {v.target.dim}; resume on the same view, or start a new run with another --out"
        )


def restore(flow: Flow, tensors: dict[str, torch.Tensor], meta: dict, cfg: TrainConfig,
            device: torch.device) -> tuple[torch.optim.Optimizer, torch.Generator]:
    """Load a checkpoint's weights into ``flow`` (on ``device``) and rebuild its optimizer and batch generator."""
    flow.load_state_dict(prefixed(tensors, "model"))
    optimizer = make_optimizer(flow, cfg.learning_rate)
    restore_optimizer(optimizer, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer"])
    generator = torch.Generator(device)
    generator.set_state(tensors["rng.batch"])
    return optimizer, generator


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (a crash after the last checkpoint), so a resumed
    run's metrics.jsonl reads as one uninterrupted run."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def fits_in_memory(view: Path | str, device: torch.device) -> bool:
    """Whether both stores' latents fit on the device with room to spare (else n2n-train streams)."""
    v = open_view(view)
    needed = sum(len(store) * store.dim * store.dtype.itemsize for store in (v.source, v.target))
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return needed < 0.5 * free


def open_data(view: Path | str, cfg: TrainConfig, norms: tuple[Standardizer, Standardizer] | None,
              dev: torch.device, stream: bool | None, start_batch: int, console: Console) -> Pairs:
    """The view on the device, or streamed from its stores (asked for, or where it would not fit)."""
    if stream is None and not fits_in_memory(view, dev):
        console.print(f"{view}: the view's latents would not fit in {dev}'s free memory: streaming them")
        stream = True
    if not stream:
        return load_pairs(view, cfg.holdout, norms).to(dev)
    return stream_pairs(view, cfg.holdout, norms, device=dev, batch_size=cfg.batch_size, seed=cfg.seed,
                        eval_rows=cfg.eval_rows, start_batch=start_batch)


def fit(view: Path | str, out: Path, cfg: TrainConfig, flow_config: FlowConfig, *, resume: bool, dev: torch.device,
        compile: bool | None, stream: bool | None, progress: bool, console: Console, ranks: Ranks,
        config: dict | None = None, init_from: Path | str | None = None) -> dict:
    """Train a new run in ``out``, or go on with its checkpoint (whose settings ``cfg`` and
    ``flow_config`` must be: n2n.train.api sees to it); return the final summary. Under torchrun
    every rank calls it. ``config``: the run's resolved options, written to ``out/config.yaml`` once
    the view has opened and the model is built. ``init_from``: a net2net checkpoint the new flow starts
    from (its ActNorms then keep their statistics)."""
    if cfg.batch_size % ranks.world:
        raise TrainError(f"--batch-size {cfg.batch_size} (the global batch) does not split over {ranks.world} "
                         "processes: make it a multiple of the process count")
    tensors, meta = load_checkpoint(out / CHECKPOINT) if resume else ({}, {"step": 0, "heldout_bpd": None})
    step = meta["step"]
    # A resumed run: bit for bit the trained-with statistics; a stream goes on after the batches drawn (init + steps).
    data = open_data(view, cfg, saved_norms(tensors) if resume else None, dev, stream, step + 1 if resume else 0,
                     console)
    try:
        # The law a new translator starts from; like the floor, it draws from no generator the run trains with.
        law = (fit_law(data, flow_config.base, flow_config.base_width, flow_config.base_steps, noise=cfg.target_noise,
                       law=flow_config.law, rank=flow_config.law_rank)
               if flow_config.start_from_floor and not resume else None)
        floor = run_floor(data, cfg, meta, ranks, console, law if flow_config.base == "linear" else None)
        torch.manual_seed(cfg.seed)  # the initial weights (a resumed run loads its own)
        cond_dim, dim = data.dims
        flow_config, sizing = sized(flow_config, dim, cond_dim, data.train_pairs)  # a resumed run's are its own
        flow = build_flow(dim, cond_dim, flow_config)
        if init_from is not None and not resume:
            start_from_net2net(flow, init_from)
        if law is not None:
            flow.start_from(law)
        flow = flow.to(dev)
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)
            if config is not None:  # with the flow's shape as built (its embedding width resolved)
                write_text_atomic(out / CONFIG_FILE, config_text({**config, **dataclasses.asdict(flow.config)}))
            if isinstance(law, LowRankGaussian):  # what n2n-eval would fit again, for over a minute at 65,536 dims
                save_law(law, out / LAW_FILE, law_record(data, noise=cfg.target_noise, law=flow_config.law,
                                                         rank=flow_config.law_rank))
        if resume:
            optimizer, generator = restore(flow, tensors, meta, cfg, dev)
            if ranks.main:
                truncate_metrics(out / "metrics.jsonl", step)
        else:
            optimizer = make_optimizer(flow, cfg.learning_rate)
            generator = torch.Generator(dev).manual_seed(cfg.seed)
            batch = data.batch(cfg.batch_size, generator, cfg.target_noise)  # drawn whatever the kind: one stream
            if flow.needs_init:
                with torch.no_grad():  # ActNorm's data-dependent init, eagerly, before any compiled graph, on a batch
                    flow(*batch)  # like the ones it will train on
        run = Run(flow, optimizer, generator, data, cfg, out, dev, ranks, console, progress, floor, step,
                  meta["heldout_bpd"], law=describe_law(law, data, cfg, ranks), sizing=sizing,
                  best=resumed_best(meta, cfg))
        if ranks.main:  # rank 0 alone logs
            run.logger = open_logger(cfg.logger, out, step if resume else None)
        try:
            if ranks.main and not resume and config is not None:
                run.logger.hparams({**config, **dataclasses.asdict(flow.config)})
            if ranks.main and cfg.logger in ("tensorboard", "wandb"):
                run.grid = sample_grid(data, cfg.log_images, console)
            return train_steps(run, compile)
        finally:
            run.logger.close()
    finally:
        data.close()


def resumed_best(meta: dict, cfg: TrainConfig) -> dict | None:
    """The best held-out NLL a resumed run goes on from: its checkpoint's, where measured on the same held-out
    rows (a new --eval-rows starts the comparison afresh); None for a new run."""
    best = meta.get("best")
    return best if best is not None and meta["train"].get("eval_rows") == cfg.eval_rows else None


def start_from_net2net(flow: Flow, checkpoint: Path | str) -> None:
    """Load a net2net checkpoint's flow into ``flow`` (net2net's architecture: affine, mlp embedder)."""
    from n2n.cinn.net2net import Net2NetError, check_shape, load_state_dict, n2n_state_dict

    try:
        check_shape(flow)
    except Net2NetError as err:
        raise TrainError(f"--init-from {checkpoint}: {err}") from None
    try:
        flow.load_state_dict(n2n_state_dict(load_state_dict(checkpoint), flow))
    except (Net2NetError, KeyError, RuntimeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrainError(f"--init-from {checkpoint}: its flow does not fit this run's ({detail}); build net2net's "
                         "flow with its config (--config its YAML: --coupling affine --embedder mlp and its sizes)") \
            from None


def draw_loss(metrics: Path, out: Path, lines: dict[str, float], console: Console) -> bool:
    """Redraw the loss plot (``plots.plot_loss``); whether to go on drawing it. A plot is never worth
    a run: any failure (a broken matplotlib, a full disk) is one warning, and no more plots."""
    try:
        plot_loss(metrics, out, lines)
    except Exception as e:
        console.print(f"[yellow]warning: could not draw {out} ({type(e).__name__}: {e}); training goes on without it")
        return False
    return True


@dataclasses.dataclass
class Run:
    """A run in progress: what its steps change (the flow, its optimizer, the batch generator, the step,
    the last held-out NLL) beside what they read (the pairs, the settings, where the run is written, the
    process's place), so that each part of the loop takes one argument."""

    flow: Flow
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    data: Pairs
    cfg: TrainConfig
    out: Path
    dev: torch.device
    ranks: Ranks
    console: Console
    progress: bool
    floor: float | None  # the linear-Gaussian floor (held-out NLL), where it was measured
    step: int
    heldout: float | None
    law: str | None = None  # what the law a new run starts from is (its describe(): linear- or MLP-Gaussian)
    sizing: str | None = None  # how a new run's open sizes were chosen (train.sizing)
    best: dict | None = None  # {"step", "heldout_bpd"} of the best held-out NLL so far: best.safetensors
    warned: bool = False  # warn_if_memorising has spoken
    logger: Logger = dataclasses.field(default_factory=Logger)  # rank 0's (train.loggers); the others log nothing
    grid: SampleGrid | None = None  # the samples the logger shows at checkpoints, where the target decodes

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def truth_bpd(self) -> float | None:
        """A synthetic view's analytic NLL in bits/dim; None for real data."""
        truth = self.data.truth
        nats = truth.get("nll_nats_per_dim") if truth is not None else None
        return nats / math.log(2) if nats is not None else None

    @property
    def train_key(self) -> str:
        """The training loss's name in metrics.jsonl: train_bpd (an NLL, coupling) or train_loss (flow matching's
        mean squared error, continuous)."""
        return "train_bpd" if self.flow.LOSS == "nll" else "train_loss"

    def train_value(self, loss: float) -> float:
        """A mean training loss as logged: an NLL of standardised targets (nats per pair) as bits/dim in the
        stores' units; flow matching's error as it is."""
        if self.train_key == "train_loss":
            return loss
        return bits_per_dim(loss + self.data.target_norm.log_abs_det, self.data.dims[1])

    def save(self) -> None:
        """The checkpoint at this step (weights, optimizer, generator, statistics), written atomically; before
        it, best.safetensors where this step's held-out NLL is the best yet (so that a crash between the two
        leaves a checkpoint whose record of the best is true, and its resume writes the same best again)."""
        if self.heldout is not None and (self.best is None or self.heldout < self.best["heldout_bpd"]):
            self.best = {"step": self.step, "heldout_bpd": self.heldout}
        tensors, meta = checkpoint_state(self.flow, self.optimizer, self.generator, self.data, self.cfg, self.step,
                                         self.heldout, self.out, self.floor, self.best)
        if self.best is not None and self.best["step"] == self.step:
            save_checkpoint(self.out / BEST, model_tensors(self.flow, self.data.source_norm, self.data.target_norm),
                            meta)
        save_checkpoint(self.checkpoint, tensors, meta)


class LossPlot:
    """loss.png, redrawn at checkpoints, unless checkpoints come faster than a plot is worth (a tiny model
    on a CPU: ~0.2 s a plot), and always at the last; after a failure, one warning and no more plots."""

    def __init__(self, run: Run) -> None:
        self.path = run.out / LOSS_PLOT
        self.lines = {label: value for label, value in (("linear-Gaussian floor", run.floor),
                                                        ("analytic NLL", run.truth_bpd)) if value is not None}
        self.working, self.next = True, 0.0

    def draw(self, run: Run, last: bool) -> None:
        if self.working and (last or time.perf_counter() >= self.next):
            started = time.perf_counter()
            self.working = draw_loss(run.metrics, self.path, self.lines, run.console)
            self.next = time.perf_counter() + (time.perf_counter() - started) / PLOT_SHARE


def announce(run: Run) -> None:
    """What is about to be trained: the view, its sizes, the model's, the batch; the floor to go below."""
    if not run.progress:
        return
    data, cfg, ranks = run.data, run.cfg, run.ranks
    shard = f", {ranks.world} processes of {cfg.batch_size // ranks.world}" if ranks.world > 1 else ""
    run.console.print(
        f"[bold]n2n-train[/] {data.view.path}: {data.dims[0]} -> {data.dims[1]} dims, {data.train_pairs} train / "
        f"{len(data.held_target)} held-out pairs, {sum(p.numel() for p in run.flow.parameters()):,} parameters, "
        f"device {run.dev}, batch {cfg.batch_size}{shard}, lr {cfg.learning_rate:.3g}"
    )
    if run.sizing is not None:
        run.console.print(run.sizing)
    if run.law is not None:
        run.console.print(f"starting at the {run.law}")
    if run.floor is not None:
        analytic = f" (analytic NLL {run.truth_bpd:.4f})" if run.truth_bpd is not None else ""
        run.console.print(f"linear-Gaussian floor: {run.floor:.4f} bits/dim held-out{analytic}: the flow must go "
                          "below it")


def mean_loss(run: Run, loss_sum: torch.Tensor, steps: int) -> float:
    """The mean loss of the last ``steps`` steps (the global batch's, under DDP, so every rank decides alike),
    after one host sync; DivergedError if it or a weight is not finite, before anything is saved."""
    if run.ranks.world > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= run.ranks.world
    mean = float(loss_sum) / steps
    params_finite = bool(torch.stack([torch.isfinite(p).all() for p in run.flow.parameters()]).all())
    if not (math.isfinite(mean) and params_finite):
        raise DivergedError(f"loss became {mean} by step {run.step}; the last good checkpoint stays in "
                            f"{run.checkpoint} (lower --lr, or check the stores with n2n-shards verify)")
    return mean


def train_steps(run: Run, compile: bool | None) -> dict:
    """Steps from ``run.step`` to ``cfg.steps``: a log line every ``log_every`` steps, an evaluation, a
    checkpoint and the loss plot every ``eval_every``; the summary at the end."""
    cfg, ranks = run.cfg, run.ranks
    # Every rank built the same weights (same seed, same init batch); DDP averages the gradients.
    objective = Objective(run.flow)
    model = DistributedDataParallel(objective) if ranks.world > 1 else objective
    step_fn = make_step(make_loss(model, run.dev.type == "cuda" if compile is None else compile, run.console),
                        run.optimizer)
    run.flow.train()
    announce(run)
    plot = LossPlot(run)
    loss_sum, train = torch.zeros((), device=run.dev), None
    t0 = last_time = time.perf_counter()
    last_step = run.step
    log_every = min(cfg.log_every, cfg.eval_every)
    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), console=run.console, disable=not (run.progress and ranks.main))
    metrics_file = open(run.metrics, "a") if ranks.main else contextlib.nullcontext()  # noqa: SIM115
    largest = activation_bytes(cfg.batch_size, run.data.dims[1])
    heap = heap_for(run.dev, largest) if cfg.heap else contextlib.nullcontext()
    with bar, metrics_file as metrics, heap:
        task = bar.add_task("train", total=cfg.steps, completed=run.step, info="")
        if run.step == 0 and run.law is not None and ranks.main:
            evaluate_start(run, metrics)
        try:
            while run.step < cfg.steps:
                x, c = run.data.batch(cfg.batch_size, run.generator, cfg.target_noise, ranks)
                loss_sum += step_fn(x, c, *rank_part(run.flow.draw(cfg.batch_size, run.generator), ranks))
                run.step += 1
                evaluate = run.step % cfg.eval_every == 0 or run.step == cfg.steps
                if run.step % log_every and not evaluate:
                    continue
                train = run.train_value(mean_loss(run, loss_sum, run.step - last_step))
                now = time.perf_counter()
                rate = (run.step - last_step) / (now - last_time)
                loss_sum.zero_()
                last_step, last_time = run.step, now
                record = {"step": run.step, run.train_key: train, "steps_per_s": rate}
                if evaluate and ranks.main:  # the others wait for it in the next step's all-reduce
                    run.heldout = record["heldout_bpd"] = heldout_bpd(run.flow, run.data, cfg.eval_rows)
                    run.save()
                    warn_if_memorising(run, train)
                if ranks.main:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    log(run, record, rate)
                    if evaluate:
                        plot.draw(run, last=run.step == cfg.steps)
                        log_samples(run)
                held = f"  held-out {run.heldout:.4f}" if run.heldout is not None else ""
                shown = f"{train:.4f} bits/dim" if run.train_key == "train_bpd" else f"loss {train:.4f}"
                bar.update(task, completed=run.step, info=f"{shown}{held}  {rate:.1f} steps/s")
        except KeyboardInterrupt:
            raise TrainError(f"interrupted at step {run.step}; the last checkpoint is in {run.checkpoint}: --resume "
                             "continues it") from None
    ranks.barrier()  # the last checkpoint is written before any rank reports the run done
    return summarize(run, train, time.perf_counter() - t0)


def evaluate_start(run: Run, metrics: IO[str]) -> None:
    """Step 0 of a run that starts at its view's law: its held-out NLL (the floor's, to within 0.01) logged
    and saved as the first best, so that best.safetensors is never worse than the start. On a view whose
    law is the truth (a Gaussian law, or few pairs: 4,000 pairs of 48 dims measured) every step of training
    only fits noise, and the start is what a user should get."""
    run.heldout = heldout_bpd(run.flow, run.data, run.cfg.eval_rows)
    if run.heldout is None:
        return
    run.save()
    metrics.write(json.dumps({"step": 0, "heldout_bpd": run.heldout}) + "\n")
    metrics.flush()
    run.logger.scalars(0, {"heldout/bpd": run.heldout})


def warn_if_memorising(run: Run, train: float) -> None:
    """Once a run: where the held-out NLL has risen above both the floor and the best so far while the train
    NLL is below the floor, the translator is learning its train pairs rather than the law behind them.
    Measured on 1,283 caption -> image pairs (coupling, defaults): held-out 2.08 at step 250 against the
    floor's 1.75, and 11.4 by step 1500; with --target-noise 0.2, 1.07."""
    floor, best = run.floor, run.best
    if run.warned or floor is None or best is None or run.heldout is None or run.train_key != "train_bpd":
        return
    if run.heldout > floor + MEMORISING_BITS and run.heldout > best["heldout_bpd"] + MEMORISING_BITS and train < floor:
        run.warned = True
        run.console.print(f"[yellow]warning: held-out NLL {run.heldout:.3f} is above the floor ({floor:.3f}) while the "
                          f"train NLL is {train:.3f}: the translator is fitting its train pairs, not the law behind "
                          f"them; best.safetensors keeps step {best['step']}'s. --target-noise (e.g. 0.2) dequantises "
                          "targets that are one point per source; more pairs or a smaller model help too")


def log(run: Run, record: dict, rate: float) -> None:
    """A metrics line to the run's logger, with what the logger shows beside it: the learning rate, the last
    step's gradient norm and, at a checkpoint, the linear-Gaussian floor."""
    kind = "bpd" if run.train_key == "train_bpd" else "loss"
    grads = [p.grad for p in run.flow.parameters() if p.grad is not None]
    values = {f"train/{kind}": record[run.train_key], "train/steps_per_s": rate,
              "train/lr": max(group["lr"] for group in run.optimizer.param_groups)}
    if grads:
        values["train/grad_norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    if record.get("heldout_bpd") is not None:
        values["heldout/bpd"] = record["heldout_bpd"]
        if run.floor is not None:
            values["heldout/linear_gaussian_bpd"] = run.floor
    run.logger.scalars(run.step, values)


def log_samples(run: Run) -> None:
    """The checkpoint's sample grid to the logger; a failure (a decoder out of memory) is one warning, and no
    more grids."""
    if run.grid is None:
        return
    try:
        run.logger.image(run.step, "samples", run.grid.draw(run.flow))
    except Exception as e:
        run.console.print(f"[yellow]warning: could not draw the samples for the logger ({type(e).__name__}: {e}); "
                          "training goes on without them")
        run.grid = None


def rank_part(drawn: tuple[torch.Tensor, ...], ranks: Ranks) -> tuple[torch.Tensor, ...]:
    """This rank's slice of random inputs drawn for the global batch (as ``train.data.rank_batch`` slices the
    pairs), so that a step is the same for any number of processes."""
    if ranks.world == 1 or not drawn:  # a coupling flow draws nothing
        return drawn
    size = len(drawn[0])
    part = slice(ranks.rank * size // ranks.world, (ranks.rank + 1) * size // ranks.world)
    return tuple(t[part] for t in drawn)


def summarize(run: Run, train: float | None, seconds: float) -> dict:
    """The end of a run: its step, NLLs (the continuous translator's training loss is flow matching's, not
    an NLL), time and checkpoint; against a synthetic view's analytic NLL too."""
    summary = {"run": str(run.out), "step": run.step, run.train_key: train, "heldout_bpd": run.heldout,
               "seconds": seconds, "checkpoint": str(run.checkpoint)}
    if run.best is not None:
        summary["best"] = {**run.best, "checkpoint": str(run.out / BEST)}
    if run.floor is not None:
        summary["linear_gaussian_bpd"] = run.floor
    if run.truth_bpd is not None and run.heldout is not None:
        summary["truth_bpd"] = run.truth_bpd
        summary["gap_nats_per_dim"] = (run.heldout - run.truth_bpd) * math.log(2)
    return summary

