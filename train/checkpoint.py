"""Checkpoints: one safetensors file holding every tensor of a run, with its JSON in the header.

Tensors: ``model.*`` (the flow's state dict), ``optim.<param>.<name>`` (optimizer moments),
``norm.{source,target}.{mean,std}`` (standardisation statistics), ``rng.*`` (generator states).
JSON (the safetensors ``__metadata__`` entry "n2n"): model config, training settings, step, the
view (relative to the run folder: ``view_record`` / ``run_view``) and both stores' identities,
optimizer hyper-parameters. One file means weights and state can
never disagree, and one ``os.replace`` makes a new checkpoint visible atomically: a crash at any
moment leaves the previous checkpoint or the new one, never half of either. Read it with
``safetensors.safe_open(path, "pt").metadata()["n2n"]``; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from n2n.cinn import ConditionalFlow, ContinuousFlow, flow_from_dict
from n2n.cinn.flow import upgrade_header
from n2n.errors import N2NError
from n2n.shards import as_path, is_remote
from n2n.shards.view import VIEW_NAME
from n2n.train.data import Standardizer

CHECKPOINT = "checkpoint.safetensors"  # the last: weights, optimizer and generator, what --resume continues
BEST = "best.safetensors"  # the weights with the best held-out NLL so far (model and norm tensors, same header)
CHECKPOINTS = ("best", "last")  # what a run's readers may load (--checkpoint): best where there is one
SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # save_file writes one beside the file, then renames it
HEADER_KEYS = ("n2n_checkpoint", "step", "model", "train", "optimizer")


class CheckpointError(N2NError):
    """A checkpoint that is missing or unreadable; the message names the file and what to do."""


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (hyper-parameters)."""
    state = optimizer.state_dict()
    tensors = {
        f"optim.{index}.{name}": value
        for index, entries in state["state"].items()
        for name, value in entries.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write atomically: a temp file in the same folder, fsync, rename over the old checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    for stale in path.parent.glob(".tmp*"):  # safetensors' own temp files, left by a process killed mid-save
        if SAFETENSORS_TMP.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"n2n": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors (on CPU) and the JSON header of a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train one with n2n-train, or point to its run folder")
    meta = read_meta(path)
    try:
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises several kinds for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable n2n checkpoint ({e}); use an earlier copy or retrain") from e
    return tensors, meta


def read_meta(path: Path) -> dict:
    """Only the JSON header: cheap, no tensor is read."""
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {})["n2n"])
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable n2n checkpoint ({e}); use an earlier copy or retrain") from e
    if not isinstance(meta, dict) or any(key not in meta for key in HEADER_KEYS):
        raise CheckpointError(f"{path} is not a readable n2n checkpoint (its header lacks "
                              f"{', '.join(HEADER_KEYS)}); use an earlier copy or retrain")
    return meta


def view_record(view: Path | str, run: Path | str) -> str:
    """How a checkpoint names its view: relative to the run folder where both are on a local disk, so
    that a project folder holding shards/ and runs/ keeps working wherever it is moved or copied; the
    URL as given where the view lives behind fsspec. Paths are taken as written (not through
    symlinks), as the user sees the folder's layout."""
    if is_remote(view):
        return str(view)
    return os.path.relpath(os.path.abspath(view), os.path.abspath(run))


def run_view(meta: dict, run: Path | str) -> Path:
    """The view a run was trained on (``run``: its folder or checkpoint file): the header's record
    resolved against the run folder, a URL as it is, or an absolute path as runs before relative
    records wrote it. Every reader of ``meta["view"]`` resolves it here; a pretrained translator
    (``save_pretrained``) records none."""
    if "view" not in meta:
        raise CheckpointError(f"{run} is a saved translator: it records no view; give the view to use (--shards, a "
                              "view of the same two experts)")
    recorded, run = meta["view"], Path(run)
    if "://" in recorded:
        return as_path(recorded)
    folder = run.parent if run.is_file() else run
    path = Path(os.path.normpath(folder / recorded))  # an absolute record stays itself
    if not (path / VIEW_NAME).is_file():
        raise CheckpointError(
            f"{run} was trained on the view recorded as {recorded}, and there is no view at {path}: put the "
            "shards folder back where it was beside the run folder, or give the view (--shards)"
        )
    return path


def saved_norms(tensors: dict[str, torch.Tensor]) -> tuple[Standardizer, Standardizer]:
    """The (source, target) standardisation a checkpoint's weights were trained with."""
    mean_std = lambda side: (tensors[f"norm.{side}.mean"], tensors[f"norm.{side}.std"])  # noqa: E731
    return Standardizer(*mean_std("source")), Standardizer(*mean_std("target"))


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.`` with the prefix removed (e.g. the model's state dict)."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


@dataclass
class TrainedFlow:
    """A trained run, ready to sample: target latents given source latents, both in stored units."""

    flow: ConditionalFlow | ContinuousFlow
    source_norm: Standardizer
    target_norm: Standardizer
    meta: dict

    @torch.no_grad()
    def sample(self, source: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
               steps: int | None = None, guidance: float = 1.0) -> torch.Tensor:
        """One target latent per row of ``source`` [B, cond_dim]: z ~ N(0, T^2 I) through the inverse flow.
        ``steps`` (the ODE solver's) and ``guidance`` (classifier-free) apply where the translator's kind
        samples with them (``SAMPLING``: the continuous one); elsewhere setting them is an error."""
        c = self.source_norm(source.float())
        return self.target_norm.inverse(self.flow.sample(c, temperature, generator,
                                                         **sampling_options(self.flow, steps=steps, guidance=guidance)))

    @torch.no_grad()
    def residual(self, target: torch.Tensor, source: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """v [B, dim] per (target, source) row pair, both in stored units: what each target holds that its
        source does not explain (the flow's residual of the standardised pair). ``steps``: a continuous
        translator's ODE steps."""
        x, c = self.target_norm(target.float()), self.source_norm(source.float())
        return self.flow.residual(x, c, **sampling_options(self.flow, steps=steps))

    @torch.no_grad()
    def recombine(self, v: torch.Tensor, source: torch.Tensor, steps: int | None = None,
                  guidance: float = 1.0) -> torch.Tensor:
        """Target latents [B, dim] in stored units: each residual of ``v`` [B, dim] under the source row beside
        it; ``recombine(residual(x, c), c)`` is x again (exactly for a coupling translator; up to the ODE
        solver's error for a continuous one)."""
        c = self.source_norm(source.float())
        x = self.flow.reverse(v.to(c.dtype), c, **sampling_options(self.flow, steps=steps, guidance=guidance))
        return self.target_norm.inverse(x)


def sampling_options(flow: nn.Module, **given: Any) -> dict[str, Any]:
    """The options of ``given`` that are set (not None, guidance not 1) for ``flow.sample``; one its kind does
    not sample with (``flow.sampling``) is a CheckpointError naming it."""
    unset = {"guidance": 1.0}
    options = {name: value for name, value in given.items() if value is not None and value != unset.get(name)}
    extra = [name for name in options if name not in flow.sampling]
    if extra:
        takes = ", ".join(f"--{name}" for name in flow.sampling) or "nothing but the temperature (one pass)"
        why = (" (guidance needs a translator trained with --cond-dropout)" if "guidance" in extra
               and "guidance" in flow.SAMPLING else "")
        raise CheckpointError(f"{' and '.join('--' + name for name in extra)}: this run's {flow.KIND} translator "
                              f"samples with {takes}{why}; leave {'them' if len(extra) > 1 else 'it'} out")
    return options


def model_tensors(flow: nn.Module, source_norm: Standardizer, target_norm: Standardizer) -> dict[str, torch.Tensor]:
    """What sampling needs of a trained translator, under the names every file that holds one uses (a
    checkpoint, best.safetensors, a saved translator's model.safetensors): ``model.*``, its weights, and
    ``norm.{source,target}.{mean,std}``, both sides' standardisation."""
    tensors = {f"model.{k}": v for k, v in flow.state_dict().items()}
    for side, norm in (("source", source_norm), ("target", target_norm)):
        tensors[f"norm.{side}.mean"], tensors[f"norm.{side}.std"] = norm.mean, norm.std
    return tensors


def trained_flow(tensors: dict[str, torch.Tensor], meta: dict, where: Path,
                 device: str | torch.device = "cpu") -> TrainedFlow:
    """The translator ``model_tensors`` and a header (``meta``: its ``model`` entry) describe, in eval mode on
    ``device``; a CheckpointError naming ``where`` if they do not make one whole model."""
    try:
        flow = flow_from_dict(upgrade_header(meta["model"]))
        flow.load_state_dict(prefixed(tensors, "model"))
        norms = saved_norms(tensors)
    except (TypeError, KeyError, RuntimeError, N2NError) as e:  # a header or tensors of another model
        raise CheckpointError(f"{where} does not hold a whole n2n model ({type(e).__name__}: {e}); "
                              "use an earlier copy or retrain") from e
    return TrainedFlow(flow.to(device).eval(), *norms, meta)


def checkpoint_file(run: Path, checkpoint: str = "best") -> Path:
    """The file of a run folder's ``checkpoint``: ``best`` is best.safetensors where the run wrote one (it
    evaluated held-out pairs), else the last; ``last`` is checkpoint.safetensors. A file is itself."""
    if checkpoint not in CHECKPOINTS:
        raise CheckpointError(f"--checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
    if not run.is_dir():
        return run
    return run / BEST if checkpoint == "best" and (run / BEST).is_file() else run / CHECKPOINT


def load_run(run: Path | str, device: str | torch.device = "cpu", checkpoint: str = "best") -> TrainedFlow:
    """Load a run folder's ``checkpoint`` (``checkpoint_file``: its best weights by default, or its last), or
    a checkpoint file, for sampling, in eval mode. (A saved translator's folder: ``translate.hub.load``.)"""
    run = Path(run)
    file = checkpoint_file(run, checkpoint)
    tensors, meta = load_checkpoint(file)
    if file.name == BEST:  # where the view is, the run's last checkpoint says (a resume on a moved view updates it)
        meta = {**meta, "view": read_meta(run / CHECKPOINT)["view"]}
    return trained_flow(tensors, meta, run, device)
