"""Where a run's curves go beside metrics.jsonl: TensorBoard (the default), Weights & Biases, CSV, or nowhere.

The names are Lightning's (``logger="tensorboard"``, ``"wandb"``, ``"csv"``), and so is the layout: the
event files lie in the run folder itself, so ``tensorboard --logdir runs`` shows every run beside the
others. Each destination is a short class with the same four methods, called by rank 0 alone:

- ``scalars(step, values)``: a dict of floats at a step (``train/bpd``, ``heldout/bpd``, ``eval/...``);
- ``image(step, name, grid)``: one picture, [3, H, W] in [0, 1] (samples decoded at a checkpoint);
- ``hparams(options)``: the run's resolved options, once;
- ``close()``.

A resumed run goes on where its checkpoint was: TensorBoard hides what the first attempt logged after that
step (``purge_step``), so a curve has neither a gap nor a doubled stretch; CSV rows after it are dropped;
W&B continues the same run (its id is kept in the run folder).
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from pathlib import Path

import torch

from n2n.errors import N2NError
from n2n.shards import write_text_atomic

LOGGERS = ("tensorboard", "wandb", "csv", "none")
CSV_FILE = "metrics.csv"
WANDB_ID = "wandb-id"  # the W&B run's id, so that --resume continues the same run
WANDB_PROJECT = "n2n"  # where runs go unless WANDB_PROJECT says otherwise


class LoggerError(N2NError):
    """A logger that cannot start (its package missing); the message names what to install."""


class Logger:
    """Logs nothing (``logger="none"``); the base of the others."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, step: int, name: str, grid: torch.Tensor) -> None:
        pass

    def hparams(self, options: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Logger):
    """Event files in ``folder`` (``torch.utils.tensorboard``); ``resumed_at``: the checkpoint's step, after
    which what an earlier attempt logged is purged from the display."""

    def __init__(self, folder: Path, resumed_at: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch imports tensorboard lazily
            raise LoggerError(f"--logger tensorboard needs the tensorboard package ({err}): pip install tensorboard, "
                              "or choose --logger csv or none") from err
        self.writer = SummaryWriter(str(folder), purge_step=None if resumed_at is None else resumed_at + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def image(self, step: int, name: str, grid: torch.Tensor) -> None:
        self.writer.add_image(name, grid.clamp(0, 1), step)
        self.writer.flush()

    def hparams(self, options: dict) -> None:
        """The options in TensorBoard's HPARAMS tab, written into this run's own event file (as Lightning
        does; ``SummaryWriter.add_hparams`` would start a second run folder)."""
        from torch.utils.tensorboard.summary import hparams

        writer = self.writer._get_file_writer()
        for summary in hparams(plain(options), {}):
            writer.add_summary(summary)

    def close(self) -> None:
        self.writer.close()


class CSV(Logger):
    """``metrics.csv`` in ``folder``: one row per value (step, name, value), appended; a resumed run first
    drops the rows after its checkpoint's step."""

    def __init__(self, folder: Path, resumed_at: int | None = None) -> None:
        self.path = folder / CSV_FILE
        if resumed_at is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [row for row in csv.reader(f)]
            kept = [rows[0], *(row for row in rows[1:] if int(row[0]) <= resumed_at)] if rows else []
            out = io.StringIO()
            csv.writer(out).writerows(kept)
            write_text_atomic(self.path, out.getvalue())
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 (closed by close)
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "name", "value"])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.writer.writerows([step, name, value] for name, value in values.items())
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandB(Logger):
    """A Weights & Biases run (``pip install 'n2n[wandb]'``) with its files under ``folder/wandb``; the same
    run id for every attempt of the run folder. ``WANDB_MODE=offline`` logs without a network (``wandb sync``
    uploads later); ``WANDB_PROJECT`` picks the project (default n2n)."""

    def __init__(self, folder: Path, resumed_at: int | None = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise LoggerError("--logger wandb needs the wandb package: pip install 'n2n[wandb]' (or choose --logger "
                              "tensorboard, csv or none)") from err
        id_file = folder / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]  # W&B's id format
        if not id_file.exists():
            write_text_atomic(id_file, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=folder.name, id=run_id,
                              resume="allow", dir=str(folder), reinit="create_new")
        self.wandb = wandb

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def image(self, step: int, name: str, grid: torch.Tensor) -> None:
        picture = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        self.run.log({name: self.wandb.Image(picture)}, step=step)

    def hparams(self, options: dict) -> None:
        self.run.config.update(plain(options), allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


def open_logger(name: str, folder: Path, resumed_at: int | None = None) -> Logger:
    """The logger ``name`` (one of LOGGERS) writing into the run folder ``folder``; ``resumed_at``: the step a
    resumed run goes on from (None for a new run)."""
    kinds = {"tensorboard": TensorBoard, "wandb": WandB, "csv": CSV}
    if name == "none":
        return Logger()
    if name not in kinds:
        raise LoggerError(f"logger {name!r}: choose one of {', '.join(LOGGERS)}")
    return kinds[name](folder, resumed_at)


def plain(options: dict) -> dict[str, bool | int | float | str]:
    """Options as hyper-parameters: numbers, strings and booleans as they are, anything else (None, paths,
    lists) as its text."""
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in options.items()}
