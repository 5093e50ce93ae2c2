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

The view folder gets ``truth.json`` beside ``view.json``: the law, its parameters and the expected
NLL, so that ``n2n-train`` can print how far a run is from the truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from n2n.options import check_value
from n2n.shards.view import create_view
from n2n.shards.writer import create_store

LAWS = ("gaussian", "bimodal", "degenerate")
DEGENERATE_NOISE = 1e-3  # the near-determined quarter's noise
BIMODAL_RADIUS = 3.0
BIMODAL_SIGMA = 0.3


def gaussian_law(rng: np.random.Generator, src_dim: int, dst_dim: int) -> dict:
    """Random A, well-conditioned B (singular values in [0.2, 1]) and offset m."""
    q, _ = np.linalg.qr(rng.standard_normal((dst_dim, dst_dim)))
    b = q * rng.uniform(0.2, 1.0, dst_dim)
    return {
        "A": rng.standard_normal((dst_dim, src_dim)) / math.sqrt(src_dim),
        "B": b,
        "m": rng.standard_normal(dst_dim),
    }


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
        eps = rng.standard_normal((len(c), params["B"].shape[1]))
        return c @ params["A"].T + eps @ params["B"].T + params["m"]
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
        cov = params["B"] @ params["B"].T
        r = x - c @ params["A"].T - params["m"]
        _, logdet = np.linalg.slogdet(cov)
        maha = np.einsum("ni,ij,nj->n", r, np.linalg.inv(cov), r)
        return 0.5 * (maha + logdet + d * math.log(2 * math.pi))
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
        d = x.shape[1]
        _, logdet = np.linalg.slogdet(params["B"] @ params["B"].T)
        return 0.5 * (logdet + d * math.log(2 * math.pi * math.e))
    return float(conditional_nll(law, params, x, c).mean())


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
    rng = np.random.default_rng(seed)
    params = LAW_PARAMS[law](rng, src_dim, dst_dim)
    c = rng.standard_normal((n, src_dim))
    x = sample(law, params, c, rng)
    view = Path(root) / f"synth-{law}"
    keys = [f"item{i:07d}" for i in range(n)]
    for name, latents in (("src", c), ("dst", x)):
        meta = {"dataset": {"name": f"synth-{law}", "seed": seed, "count": n}, "split": "train",
                "expert": {"spec": f"synthetic:{name}"}}
        writer = create_store(view / name, dim=latents.shape[1], dtype="float32", format=format, meta=meta)
        writer.append(keys, np.zeros(n, dtype=np.int64), latents.astype(np.float32))
        writer.close()
    create_view(view, view / "src", view / "dst")
    truth = {
        "law": law,
        "nll_nats_per_dim": None if law == "degenerate" else expected_nll(law, params, x, c) / dst_dim,
        "params": {k: v.tolist() for k, v in params.items()},
        "sigma": BIMODAL_SIGMA if law == "bimodal" else None,
        "radius": BIMODAL_RADIUS if law == "bimodal" else None,
    }
    (view / "truth.json").write_text(json.dumps(truth, indent=1))
    return view
