"""Paired latent stores with a known conditional law: checks the trainer without any expert.

Three laws, all with c ~ N(0, I):
- ``gaussian``: x = A c + B eps + m. p(x | c) = N(A c + m, B B^T), so the conditional NLL is
  analytic: 0.5 * log det(2 pi e B B^T) nats. A trained cINN's held-out NLL must come close to it.
- ``bimodal``:  x = s * (r u + P c) + sigma eps with s = +-1 at random, u a unit vector and P c
  orthogonal to u. Given c, x has two modes at +-(r u + P c); a model that averages them (an MLP
  regressor) lands between; a cINN must sample both.
- ``degenerate``: the Gaussian law with a quarter of the target dims constant (a dead unit, an image's
  border), a quarter determined by c exactly, a quarter nearly (noise 1e-3), and a quarter ordinary.
  The targets of plug-in experts look like this; it has no density (the constant dims are point
  masses), so no analytic NLL, but a translator must train on it as stably as on any other.

The view folder gets ``truth.json`` beside ``view.json`` (the law and the expected NLL, so that
``n2n-train`` can print how far a run is from the truth) and ``truth.npz``, the law's parameters
(``read_law``). Every cost is O(d·k) past DENSE_WIDTH target dims: there B's rotation is a product of
REFLECTIONS Householder reflections, not a dense d x d matrix (65,536 dims would need 32 GiB), and the
rows are drawn and written CHUNK_NUMBERS at a time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from n2n.errors import N2NError
from n2n.files import write_json_atomic
from n2n.options import check_value
from n2n.shards.view import create_view
from n2n.shards.writer import create_store

LAWS = ("gaussian", "bimodal", "degenerate")
DEGENERATE_NOISE = 1e-3  # the near-determined quarter's noise
BIMODAL_RADIUS = 3.0
BIMODAL_SIGMA = 0.3
DENSE_WIDTH = 4096  # up to here B = Q S with a dense random rotation Q (QR of d x d Gaussians)
REFLECTIONS = 32  # wider, Q = H_1 ... H_k, H_i = I - 2 u_i u_i^T: the noise is correlated, stored as k x d
CHUNK_NUMBERS = 2**24  # rows drawn at a time: 128 MiB of float64 (a small view is drawn in one go)


def gaussian_law(rng: np.random.Generator, src_dim: int, dst_dim: int) -> dict:
    """Random A, well-conditioned B = Q S (singular values S in [0.2, 1]) and offset m. Q is dense up to
    DENSE_WIDTH dims (params ``B``), else reflections ``U`` with the singular values ``s``."""
    if dst_dim <= DENSE_WIDTH:
        q, _ = np.linalg.qr(rng.standard_normal((dst_dim, dst_dim)))
        noise = {"B": q * rng.uniform(0.2, 1.0, dst_dim)}
    else:
        u = rng.standard_normal((REFLECTIONS, dst_dim))
        noise = {"U": u / np.linalg.norm(u, axis=1, keepdims=True), "s": rng.uniform(0.2, 1.0, dst_dim)}
    return {"A": rng.standard_normal((dst_dim, src_dim)) / math.sqrt(src_dim), **noise,
            "m": rng.standard_normal(dst_dim)}


def reflect(u: np.ndarray, y: np.ndarray, transpose: bool = False) -> np.ndarray:
    """Rows y mapped by Q = H_1 ... H_k (its transpose when asked): O(n·d·k), never d x d."""
    for v in (u if transpose else u[::-1]):
        y = y - 2 * np.outer(y @ v, v)
    return y


def noise(params: dict, eps: np.ndarray) -> np.ndarray:
    """B eps for each row of eps."""
    return eps @ params["B"].T if "B" in params else reflect(params["U"], eps * params["s"])


def noise_logdet(params: dict) -> float:
    """log det(B B^T): Q is orthogonal, so past DENSE_WIDTH it is that of S^2."""
    if "B" in params:
        return float(np.linalg.slogdet(params["B"] @ params["B"].T)[1])
    return float(2 * np.log(params["s"]).sum())


def degenerate_law(rng: np.random.Generator, src_dim: int, dst_dim: int) -> dict:
    """The Gaussian law's A, B and m, with B's rows zero for the constant and determined quarters (A's too
    for the constant one, half of whose offsets are 0), DEGENERATE_NOISE for the near-determined quarter."""
    law = gaussian_law(rng, src_dim, dst_dim)
    k = dst_dim // 4
    law["A"][:k] = 0
    law["m"][:k:2] = 0
    law["B"][: 2 * k] = 0
    law["B"][2 * k : 3 * k] = 0
    law["B"][2 * k : 3 * k, 2 * k : 3 * k] = DEGENERATE_NOISE * np.eye(k)
    return law


def bimodal_law(rng: np.random.Generator, src_dim: int, dst_dim: int) -> dict:
    u = rng.standard_normal(dst_dim)
    u /= np.linalg.norm(u)
    p = rng.standard_normal((dst_dim, src_dim)) / math.sqrt(src_dim)
    p -= np.outer(u, u @ p)  # P c never moves along u, so the modes stay 2 r apart
    return {"u": u, "P": 0.5 * p}


LAW_PARAMS = {"gaussian": gaussian_law, "bimodal": bimodal_law, "degenerate": degenerate_law}


def sample(law: str, params: dict, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw x ~ p(x | c) for each row of c."""
    if law in ("gaussian", "degenerate"):
        eps = rng.standard_normal((len(c), len(params["m"])))
        return c @ params["A"].T + noise(params, eps) + params["m"]
    mean = modes(params, c)
    sign = rng.choice([-1.0, 1.0], size=(len(c), 1))
    return sign * mean + BIMODAL_SIGMA * rng.standard_normal(mean.shape)


def modes(params: dict, c: np.ndarray) -> np.ndarray:
    """The bimodal law's positive mode r u + P c for each row of c; the other one is its negative."""
    return BIMODAL_RADIUS * params["u"] + c @ params["P"].T


def conditional_nll(law: str, params: dict, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Exact -log p(x | c) in nats for each row."""
    d = x.shape[1]
    if law == "gaussian":
        r = x - c @ params["A"].T - params["m"]
        if "B" in params:
            maha = np.einsum("ni,ij,nj->n", r, np.linalg.inv(params["B"] @ params["B"].T), r)
        else:
            maha = ((reflect(params["U"], r, transpose=True) / params["s"]) ** 2).sum(1)
        return 0.5 * (maha + noise_logdet(params) + d * math.log(2 * math.pi))
    mean = modes(params, c)
    s2 = BIMODAL_SIGMA**2
    logp = [-0.5 * ((x - sgn * mean) ** 2).sum(1) / s2 for sgn in (1, -1)]
    log_norm = 0.5 * d * math.log(2 * math.pi * s2)
    return -(np.logaddexp(*logp) - math.log(2) - log_norm)


def expected_nll(law: str, params: dict, x: np.ndarray, c: np.ndarray) -> float | None:
    """E[-log p(x | c)] in nats: closed form for the Gaussian law, the sample mean for the bimodal one; None
    for the degenerate one (point masses have no density)."""
    if law == "degenerate":
        return None
    if law == "gaussian":
        return 0.5 * (noise_logdet(params) + x.shape[1] * math.log(2 * math.pi * math.e))
    return float(conditional_nll(law, params, x, c).mean())


def read_law(view: Path | str) -> tuple[str, dict[str, np.ndarray]]:
    """A synthetic view's law and its parameters (truth.npz; views written before it keep them in
    truth.json)."""
    view = Path(view)
    truth = json.loads((view / "truth.json").read_text())
    if "params" in truth:
        return truth["law"], {k: np.array(v) for k, v in truth["params"].items()}
    with np.load(view / "truth.npz", allow_pickle=False) as saved:
        return truth["law"], dict(saved)


def write_synthetic(
    root: Path,
    law: str = "gaussian",
    n: int = 100_000,
    src_dim: int = 16,
    dst_dim: int = 8,
    seed: int = 0,
    format: str = "zarr",
) -> Path:
    """Write ``root/synth-<law>/{src,dst}`` stores and the view ``root/synth-<law>``; return the view.

    Stores are float32 so that storage rounding does not blur the comparison with the analytic NLL.
    Every argument is checked before anything is written (an N2NError naming it and its range).
    """
    check_value("law", law, choices=LAWS)
    for name, value, least in (("n", n, 1), ("src_dim", src_dim, 1), ("dst_dim", dst_dim, 1), ("seed", seed, 0)):
        check_value(name, value, integer=True, min=least)
    if law == "degenerate" and dst_dim > DENSE_WIDTH:
        raise N2NError(f"dst_dim (--dst-dim) = {dst_dim}: the degenerate law is dense, at most {DENSE_WIDTH} "
                       "dims; use --law gaussian or bimodal for a wider view")
    rng = np.random.default_rng(seed)
    params = LAW_PARAMS[law](rng, src_dim, dst_dim)
    c = rng.standard_normal((n, src_dim))
    view = Path(root) / f"synth-{law}"
    keys = [f"item{i:07d}" for i in range(n)]
    labels = np.zeros(n, dtype=np.int64)
    writers = {name: create_store(view / name, dim=dim, dtype="float32", format=format,
                                  meta={"dataset": {"name": f"synth-{law}", "seed": seed, "count": n},
                                        "split": "train", "expert": {"spec": f"synthetic:{name}"}})
               for name, dim in (("src", src_dim), ("dst", dst_dim))}
    writers["src"].append(keys, labels, c.astype(np.float32))
    rows, bimodal_nll = max(1, CHUNK_NUMBERS // dst_dim), 0.0  # the bimodal law's NLL is a sample mean
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        x = sample(law, params, c[block], rng)
        writers["dst"].append(keys[block], labels[block], x.astype(np.float32))
        if law == "bimodal":
            bimodal_nll += conditional_nll(law, params, x, c[block]).sum() / n
    for writer in writers.values():
        writer.close()
    create_view(view, view / "src", view / "dst")
    nll = expected_nll(law, params, x, c) if law == "gaussian" else bimodal_nll if law == "bimodal" else None
    save_npz_atomic(view / "truth.npz", params)
    write_json_atomic(view / "truth.json", {
        "law": law,
        "nll_nats_per_dim": None if nll is None else nll / dst_dim,
        "sigma": BIMODAL_SIGMA if law == "bimodal" else None,
        "radius": BIMODAL_RADIUS if law == "bimodal" else None,
    })
    return view


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Arrays written beside ``path`` and renamed onto it."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
