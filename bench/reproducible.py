"""The price of latents that do not depend on the thread count: n2n-extract with MKL's strict
reproducible mode (what ``import n2n`` sets, see n2n's docstring) against MKL's default.

Each extraction is the real command (``python -m n2n.extract``) in a fresh process, since MKL reads its
mode at the first matrix product: MiniLM on shapes captions and a random-weight timm resnet18 on shapes
images (``--experts``), at one thread and at every core, in both modes, repeated and interleaved so
that a slow moment of the machine hits both. The ratio is strict mode's median wall time over the
default's at every core. Beside it: whether the latents written at one thread and at every core are
the same bits in each mode (float32 stores, so no rounding to float16 hides a difference), over small
batches (``--bits-batch``): MKL's default mode has been seen to change the bits of batches of 1 and
4..12 captions with the thread count on an Intel Xeon, not of larger ones.
Run: python -m bench.reproducible [--items 400 --repeat 3]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from bench.common import Row, report
from bench.models import save_timm
from n2n.parallel import usable_cores
from n2n.shards import open_store

MODES = {"default": "", "strict": "AUTO,STRICT"}  # "" is MKL's default; n2n keeps a value that is set
EXPERTS = ("minilm", "timm")
TARGET = 1.05


def extract(spec: str, weights: Path | None, items: int, out: Path, threads: int, mode: str,
            batch_size: int = 64) -> float:
    """Wall seconds of one n2n-extract in a fresh process with ``threads`` torch threads in MKL ``mode``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_CBWR": MODES[mode], "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "n2n.extract", "--expert", spec, "--data", "shapes", "--limit", str(items),
           "--out", str(out), "--dtype", "float32", "--num-workers", "1", "--device", "cpu", "--overwrite",
           "--batch-size", str(batch_size)]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def latents(out: Path) -> np.ndarray:
    (store,) = [path.parent for path in out.glob("shapes/*/meta.json")]
    return open_store(store).latents()


@click.command()
@click.option("--items", default=400, show_default=True, help="shapes items per extraction (MiniLM: 5 captions each).")
@click.option("--repeat", default=3, show_default=True, help="Extractions per expert, thread count and mode.")
@click.option("--bits-items", default=12, show_default=True, help="Items of the extractions whose bits are compared.")
@click.option("--bits-batch", default=2, show_default=True, help="Their batch size (MiniLM: 10 captions a batch).")
@click.option("--experts", default=",".join(EXPERTS), show_default=True, help="Rows to measure (comma-separated).")
def main(items: int, repeat: int, bits_items: int, bits_batch: int, experts: str) -> None:
    names = [name.strip() for name in experts.split(",") if name.strip()]
    if not names or set(names) - set(EXPERTS):
        raise click.BadParameter(f"{experts!r}: give some of {','.join(EXPERTS)}", param_hint="--experts")
    cores = usable_cores()
    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="n2n-bench-") as tmp:
        tmp = Path(tmp)
        for name in names:
            spec, weights = ("minilm", None) if name == "minilm" else ("timm:resnet18", save_timm(tmp, "resnet18"))
            seconds = {(t, m): [] for t in sorted({1, cores}) for m in MODES}
            for _ in range(repeat):
                for threads, mode in seconds:
                    seconds[threads, mode].append(extract(spec, weights, items, tmp / name / f"{threads}-{mode}",
                                                          threads, mode))
            same = {}
            for mode in MODES:
                for threads in sorted({1, cores}):
                    extract(spec, weights, bits_items, tmp / name / f"bits-{threads}-{mode}", threads, mode, bits_batch)
                same[mode] = np.array_equal(latents(tmp / name / f"bits-1-{mode}"),
                                            latents(tmp / name / f"bits-{cores}-{mode}"))
            medians = {f"{t} threads {m}": statistics.median(s) for (t, m), s in seconds.items()}
            raw[name] = {"spec": spec, "items": items, "seconds": {f"{t} threads {m}": s for (t, m), s in
                                                                   seconds.items()},
                         "same_bits_1_vs_all_threads": same}
            for threads in sorted({1, cores}):
                strict, default = medians[f"{threads} threads strict"], medians[f"{threads} threads default"]
                ratio = strict / default
                rows.append(Row(f"n2n-extract {spec} on {items} items, {threads} thread(s): MKL strict CNR vs "
                                "MKL's default (wall time)", f"{strict:.1f} s", f"{default:.1f} s", ratio,
                                f"<= {TARGET}x", ratio <= TARGET))
            rows.append(Row(f"{spec} on {bits_items} items in batches of {bits_batch}: latents at 1 and {cores} "
                            "threads, same bits (strict / default)",
                            "yes" if same["strict"] else "no", "yes" if same["default"] else "no", None,
                            "strict: yes", same["strict"]))
    report("reproducible", {"items": items, "repeat": repeat, "bits_items": bits_items, "bits_batch": bits_batch,
                            "experts": names, "cores": cores}, rows, raw)


if __name__ == "__main__":
    main()
