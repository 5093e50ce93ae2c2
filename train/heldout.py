"""Held-out scores a run and its evaluation share: the flow's held-out NLL, and the linear-Gaussian
floor it must clear, both in bits/dim of the target latent in its stored units.

n2n-train prints and plots them; n2n-eval reports them beside its baselines. They live here, not in
the trainer, so that evaluation reads no training internals.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from n2n.cinn import ConditionalFlow, bits_per_dim, nll
from n2n.cinn.flow import low_rank
from n2n.cinn.gaussian import GaussianLaw, LinearGaussian, Regularisation
from n2n.cinn.lowrank_gaussian import RANK, LowRankGaussian
from n2n.cinn.mlp_gaussian import HIDDEN, MLPGaussian
from n2n.shards.view import open_view
from n2n.train.checkpoint import save_checkpoint
from n2n.train.data import PairedLatents, Pairs, subsample
from n2n.train.stream import StreamedPairs, read_rows

FLOOR_ROWS = 50_000  # train pairs the linear-Gaussian floor is fitted on
ROW_NUMBERS = 2**27  # at most this many target numbers in a low-rank law's fit (1 GiB an array in float64)


@torch.no_grad()
def held_bpd(pair_nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], data: Pairs, rows: int,
             chunk: int = 4096) -> float | None:
    """The mean of ``pair_nll(target, source)`` (nats per pair, standardised units) over the first ``rows``
    held-out pairs, as bits/dim of the target latent in its stored units (the standardisation's
    log-determinant added back), so that it is comparable across runs, models and with an analytic NLL;
    None where there is no held-out pair."""
    x, c = data.held_target[:rows], data.held_source[:rows]
    if len(x) == 0:
        return None
    total = sum(float(pair_nll(x[i : i + chunk], c[i : i + chunk]).double().sum()) for i in range(0, len(x), chunk))
    return float(bits_per_dim(total / len(x) + data.target_norm.log_abs_det, x.shape[1]))


def heldout_bpd(flow: ConditionalFlow, data: Pairs, rows: int, chunk: int = 4096) -> float | None:
    """The flow's held-out NLL (``held_bpd``), computed in eval mode."""
    was_training = flow.training
    flow.eval()
    try:
        return held_bpd(lambda x, c: nll(*flow(x, c)), data, rows, chunk)
    finally:
        flow.train(was_training)


def floor_pairs(data: Pairs, fit_rows: int, seed: int,
                noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``fit_rows`` standardised train pairs as (source, target, group), drawn from ``seed`` alone:
    neither the training generator nor a stream's position moves, so a run (and its resume) trains
    on the batches it would have without them. ``group``: each pair's target row, so that pairs sharing a
    target (the captions of one image) are held out together where the law is cross-validated.

    A resident view gives distinct rows (``subsample``: all of them where there are fewer, as
    ``train.data.subsample`` picks them). A streamed one cannot
    use its ``batch`` (it draws the stream's next batch, of the run's batch size only): whole source
    files are taken in a seeded random order until they hold ``fit_rows`` pairs, read through a
    view of its own (the stream's reader thread keeps its stores), so that only those files are
    read. ``noise`` (standard deviation, standardised units) is the run's --target-noise: the law
    is fitted on the targets the flow trains on.
    """
    if isinstance(data, PairedLatents):
        index = torch.from_numpy(subsample(len(data.target), fit_rows, seed)).to(data.target.device)
        source, target = data.source[index], data.target[index]
        group = data.target.index[index].cpu()
    elif isinstance(data, StreamedPairs):
        stream, device = data.stream, data.held_target.device
        order, chosen, count = np.random.default_rng(seed).permutation(len(stream.file_start) - 1), [], 0
        for file in order:
            if count >= fit_rows:
                break
            pairs = stream.by_file[stream.file_start[file] : stream.file_start[file + 1]]
            chosen.append(pairs)
            count += len(pairs)
        pairs = np.sort(np.concatenate(chosen))
        pairs = pairs[subsample(len(pairs), fit_rows, seed)]
        view = open_view(data.view.path)
        source = read_rows(view.source, stream.source_index[pairs], data.source_norm, device)[:]
        target = read_rows(view.target, stream.target_index[pairs], data.target_norm, device)[:]
        group = torch.from_numpy(np.asarray(stream.target_index[pairs], dtype=np.int64))
    else:  # another Pairs: a batch of its own generator's
        target, source = data.batch(fit_rows, torch.Generator(data.held_target.device).manual_seed(seed))
        group = torch.arange(len(target))
    if noise:
        generator = torch.Generator(target.device).manual_seed(seed)
        target = target + noise * torch.randn(target.shape, generator=generator, device=target.device)
    return source, target, group


def fit_floor(data: Pairs, fit_rows: int = FLOOR_ROWS, seed: int = 0, noise: float = 0.0, law: str = "auto",
              rank: int = RANK) -> LinearGaussian | LowRankGaussian:
    """The linear-Gaussian law p(target | source) = N(W source + b, Sigma) (``cinn.gaussian.LinearGaussian``)
    fitted on up to ``fit_rows`` standardised train pairs (``floor_pairs``): the floor a flow must clear, and
    (its mean) the linear least-squares translator n2n-eval reads a run against. Cross-validated ridge and
    covariance, in float64 on the rows' device: seconds on a CPU for 50k pairs of 384 dims. Where the target
    gets the low-rank law (``law``: ``FlowConfig.law``; above FULL_WIDTH dims by default) it is the
    ``LowRankGaussian`` of ``rank`` directions, on at most ROW_NUMBERS / dim pairs (2,048 of 65,536 dims)."""
    dim = data.dims[1]
    if low_rank(dim, law):
        rows = max(2, min(fit_rows, ROW_NUMBERS // dim))
        return LowRankGaussian.fit(*floor_pairs(data, rows, seed, noise), rank=rank)
    return LinearGaussian.fit(*floor_pairs(data, fit_rows, seed, noise))


LAW_FILE = "law.safetensors"  # a run's low-rank floor, as n2n-train fitted it: n2n-eval reads it, not fits it again


def law_record(data: Pairs, seed: int = 0, noise: float = 0.0, law: str = "auto", rank: int = RANK) -> dict:
    """What ``fit_floor`` fits from besides the rows: equal records on one view's pairs are equal laws."""
    return {"seed": seed, "noise": noise, "law": law, "rank": rank, "fit_rows": FLOOR_ROWS,
            "resident": isinstance(data, PairedLatents),  # a streamed view's fit reads whole files (floor_pairs)
            "train_pairs": data.train_pairs, "held_pairs": len(data.held_target), "dims": list(data.dims)}


def save_law(law: LowRankGaussian, path: Path, record: dict) -> None:
    """A low-rank law (O(d·k): 240 MB at 65,536 dims, where its fit takes over a minute) with its ``record``."""
    tensors = {f.name: getattr(law, f.name) for f in dataclasses.fields(law) if f.name != "regularisation"}
    reg = law.regularisation
    save_checkpoint(path, tensors, {"record": record,
                                    "regularisation": None if reg is None else dataclasses.asdict(reg)})


def read_law(path: Path, record: dict) -> LowRankGaussian | None:
    """The law ``save_law`` wrote at ``path`` from ``record``; None where there is none, it is unreadable, or
    it was fitted otherwise (another seed, target noise, law, or the view's rows since changed)."""
    if not Path(path).is_file():
        return None
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("n2n", "{}"))
            if meta.get("record") != record:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception:  # noqa: BLE001  safetensors raises several kinds for truncated or foreign files: fit it again
        return None
    reg = meta.get("regularisation")
    return LowRankGaussian(**tensors, regularisation=None if reg is None else Regularisation(**reg))


def fit_law(data: Pairs, base: str = "linear", width: int = HIDDEN, steps: int = 2000, fit_rows: int = FLOOR_ROWS,
            seed: int = 0, noise: float = 0.0, law: str = "auto", rank: int = RANK) -> GaussianLaw:
    """The law a new translator starts from (``FlowConfig.base``): ``fit_floor``'s linear-Gaussian law, or the
    MLP-Gaussian law (``cinn.mlp_gaussian``: an MLP of ``width`` fitted first, ``steps`` steps) on the same train
    pairs."""
    if base == "linear":
        return fit_floor(data, fit_rows, seed, noise, law, rank)
    return MLPGaussian.fit(*floor_pairs(data, fit_rows, seed, noise), steps=steps, hidden=width, seed=seed)


def floor_bpd(law: GaussianLaw, data: Pairs, rows: int) -> float | None:
    """``law``'s held-out NLL (``held_bpd``), in the units of ``heldout_bpd``, so the two compare directly."""
    return held_bpd(lambda x, c: law.nll(c, x), data, rows)


def linear_gaussian_bpd(data: Pairs, rows: int, fit_rows: int = FLOOR_ROWS, seed: int = 0,
                        noise: float = 0.0) -> float | None:
    """The floor a flow must clear: ``fit_floor``'s held-out NLL (``floor_bpd``); None without held-out pairs."""
    if len(data.held_target) == 0 or rows <= 0:
        return None
    return floor_bpd(fit_floor(data, fit_rows, seed, noise), data, rows)
