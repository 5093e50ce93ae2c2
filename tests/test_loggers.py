"""n2n-train's loggers: TensorBoard event files (read back with tensorboard's own reader), W&B in offline mode,
CSV and none; a resumed run's curves without a gap or a doubled stretch; n2n-eval's scores in the same logger."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import n2n
from n2n.train.loggers import WANDB_ID

TINY = {"n_flows": 2, "hidden_dim": 16, "batch_size": 32, "compile": False, "progress": False, "log_every": 5}


@pytest.fixture(scope="module")
def view(ae_view) -> Path:
    return ae_view


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps_of(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def test_tensorboard_is_the_default_with_curves_samples_and_options(view, tmp_path):
    run = n2n.train(view, tmp_path / "run", steps=20, eval_every=10, log_images=2, **TINY)
    logged = events(run)
    scalars = set(logged.Tags()["scalars"])
    assert {"train/bpd", "train/lr", "train/grad_norm", "train/steps_per_s", "heldout/bpd",
            "heldout/linear_gaussian_bpd"} <= scalars
    assert steps_of(logged, "train/bpd") == [5, 10, 15, 20]
    assert steps_of(logged, "heldout/bpd") == [0, 10, 20]  # 0: the start, the first candidate for the best
    metrics = [line for line in (run / "metrics.jsonl").read_text().splitlines() if "heldout_bpd" in line]
    assert logged.Scalars("heldout/bpd")[-1].value == pytest.approx(json.loads(metrics[-1])["heldout_bpd"],
                                                                    rel=1e-6)
    samples = logged.Images("samples")
    assert [image.step for image in samples] == [10, 20]
    assert samples[0].height > 32 and samples[0].width > 4 * 32  # two sources, four samples each, 32 px
    options = logged.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"n_flows" in options and b"hidden_dim" in options  # the resolved options, as hyper-parameters
    assert not (run / "metrics.csv").exists()


def test_a_resumed_run_continues_its_curves_without_a_gap_or_a_doubled_step(view, tmp_path):
    run = n2n.train(view, tmp_path / "run", steps=10, eval_every=10, **TINY)
    crashed = SummaryWriter(str(run))  # what an attempt killed after its checkpoint had logged beyond it
    crashed.add_scalar("train/bpd", 999.0, 15)
    crashed.close()
    n2n.train(view, run, steps=20, eval_every=10, resume=True, **TINY)
    curve = events(run).Scalars("train/bpd")
    assert [event.step for event in curve] == [5, 10, 15, 20]
    assert all(event.value != 999.0 for event in curve)


def test_csv_keeps_rows_up_to_the_checkpoint_on_resume_and_none_writes_nothing(view, tmp_path):
    run = n2n.train(view, tmp_path / "csv", steps=10, eval_every=10, logger="csv", **TINY)
    with open(run / "metrics.csv", "a", newline="") as f:
        csv.writer(f).writerow([15, "train/bpd", 999.0])  # logged by an attempt that died after the checkpoint
    n2n.train(view, run, steps=20, eval_every=10, resume=True, logger="csv", **TINY)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["value"])) for r in rows if r["name"] == "train/bpd"]
    assert [step for step, _ in train] == [5, 10, 15, 20] and 999.0 not in [value for _, value in train]
    assert not list(run.glob("events.out.tfevents*"))
    quiet = n2n.train(view, tmp_path / "none", steps=5, logger="none", **TINY)
    assert not list(quiet.glob("events.out.tfevents*")) and not (quiet / "metrics.csv").exists()


def test_wandb_offline_writes_one_run_that_a_resume_continues(view, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = n2n.train(view, tmp_path / "run", steps=10, eval_every=10, logger="wandb", **TINY)
    run_id = (run / WANDB_ID).read_text().strip()
    n2n.train(view, run, steps=20, eval_every=10, resume=True, logger="wandb", **TINY)
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(folder.name.split("-")[-1] == run_id or
                                      folder.name.split("-")[-2] == run_id for folder in attempts)
    records = b"".join(path.read_bytes() for path in (run / "wandb").rglob("*.wandb"))
    assert b"train/bpd" in records and b"heldout/bpd" in records


def test_a_logger_not_installed_is_one_line_naming_the_extra(view, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_wandb)
    with pytest.raises(n2n.N2NError, match=r"pip install 'n2n\[wandb\]'"):
        n2n.train(view, tmp_path / "run", steps=5, logger="wandb", **TINY)


def test_n2n_eval_logs_its_scores_at_the_runs_step(view, tmp_path):
    run = n2n.train(view, tmp_path / "run", steps=10, eval_every=10, holdout=0.2, **TINY)
    report = n2n.evaluate(run, samples=2, baseline_steps=5, progress=False, checkpoint="last")
    logged = events(run)
    assert steps_of(logged, "eval/heldout_bpd") == [10]
    top1 = logged.Scalars("eval/translation/translator/retrieval/top1")[0].value
    assert top1 == pytest.approx(report["translation"]["translator"]["retrieval"]["top1"])
