"""The conditional invertible network: net2net's ConditionalFlatCouplingFlow, in one file, with the
changes measurements asked for.

A flow maps a target latent x to z ~ N(0, I) given a condition c (the source expert's latent):

    h = embedder(c)                                   (once per call, shared by every block)
    x = A (x - W c - b)                               (the linear-Gaussian start, cinn.linear_stage; optional)
    for each of n_flows blocks:
        x = ActNorm(x)                                (data-dependent init on the first batch)
        x = coupling(x, h)                            (two affine half-couplings)
        x = Shuffle(x)                                (a fixed permutation)

The defaults are a Linear embedder and ``GlowCoupling`` (one net per half for log-scale and shift);
net2net's MLP embedder and ``DoubleAffineCoupling`` (separate s and t nets) are options. Every piece
is a short class with ``forward`` (x -> y, log|det J|) and ``reverse`` (y -> x), so the inverse is
exact and the log-determinant is a sum of per-piece terms. ``FlowConfig`` is the one description of
a flow's shape: the flow, n2n-train's options and a checkpoint's header all read it, so a new option
is one field and a new coupling type one entry of ``COUPLINGS``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

from n2n.cinn.gaussian import GaussianLaw
from n2n.cinn.linear_stage import LinearGaussianStage, LowRankStage, rename_old_stage
from n2n.cinn.loss import nll
from n2n.cinn.lowrank_gaussian import FULL_WIDTH, RANK
from n2n.options import check_fields, setting

NORMS = ("layer", "batch", "none")
BASES = ("linear", "mlp")  # FlowConfig.base: the mean of the law a translator starts from
LAWS = ("auto", "full", "lowrank")  # FlowConfig.law: its covariance


def mlp(
    in_dim: int, hidden_dim: int, depth: int, out_dim: int, norm: str = "none", tanh: bool = False
) -> nn.Sequential:
    """net2net's BasicFullyConnectedNet: Linear, then ``depth`` hidden Linear layers, then an output Linear.

    ``norm`` follows every hidden Linear. ``tanh`` bounds the output (used for log-scales, so that
    one coupling can never scale by more than e in either direction: the flow stays well conditioned).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")

    def hidden(d_in: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Linear(d_in, hidden_dim)]
        if norm == "layer":
            layers.append(nn.LayerNorm(hidden_dim))
        elif norm == "batch":
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.LeakyReLU())
        return layers

    layers = hidden(in_dim)
    for _ in range(depth):
        layers += hidden(hidden_dim)
    layers.append(nn.Linear(hidden_dim, out_dim))
    if tanh:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ActNorm(nn.Module):
    """y = scale * (x + loc), per dimension; initialised from the first training batch so that y has
    zero mean and unit variance there (Glow). Keeps deep flows trainable from step one.

    A dimension that is constant in that batch keeps scale 1 instead of Glow's 1 / (0 + eps): a
    constant latent dimension is real (MiniLM has some), and a scale of 1e6 would turn any later
    variation in it into an overflow.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(dim))
        self.register_buffer("initialized", torch.tensor(False))
        # A Python mirror of the buffer: checking a tensor flag every step would sync the device and
        # break torch.compile graphs. Kept in step by initialize() and _load_from_state_dict().
        self.needs_init = True

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        self.loc.copy_(-x.mean(0))
        std = x.std(0)
        self.scale.copy_(torch.where(std > 1e-4, 1.0 / std, torch.ones_like(std)))
        self.initialized.fill_(True)
        self.needs_init = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.needs_init = not bool(self.initialized)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and self.needs_init:
            self.initialize(x)
        logdet = self.scale.abs().log().sum().expand(x.shape[0])
        return self.scale * (x + self.loc), logdet

    def reverse(self, y: Tensor) -> Tensor:
        return y / self.scale - self.loc


class PairedMLP(nn.Module):
    """The log-scale net s and the shift net t of one half-coupling, run as one batched net.

    Both read the same input, so their weights are stacked ([2, in, out] per layer) and one
    ``baddbmm`` computes a layer of both: the function of two separate ``mlp(..., norm="none")``
    nets, with half the kernel launches (what costs at small batches on a GPU). Measured on the
    net2net-size step on CPU (bench.fused_coupling): 1.03x at batch 64, 1.02x at 256. s is
    tanh-bounded.
    """

    def __init__(self, in_dim: int, hidden_dim: int, depth: int, out_dim: int) -> None:
        super().__init__()
        sizes = [in_dim] + [hidden_dim] * (depth + 1) + [out_dim]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(2, a, b)) for a, b in itertools.pairwise(sizes))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(2, 1, b)) for b in sizes[1:])
        for weight, bias in zip(self.weights, self.biases, strict=True):
            bound = weight.shape[1] ** -0.5  # nn.Linear's default init, per net
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """u [B, in] -> (s, t), each [B, out]."""
        y = u.expand(2, *u.shape)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            y = torch.baddbmm(bias, y, weight)
            if i < len(self.weights) - 1:
                y = nn.functional.leaky_relu(y)
        return torch.tanh(y[0]), y[1]


class HalfCouplings(nn.Module):
    """Two affine half-couplings: the second half is scaled and shifted by a net that sees
    [first half; h], then the first half by a net that sees [new second half; h].

    After both, every dimension has been transformed once, conditioned on the other half and on the
    embedding h. A coupling type is a subclass that builds ``net1`` (for the second half) and
    ``net2`` and says, in ``scale_shift``, how a net's output becomes (log-scale, shift).
    """

    split: int  # the first half's size, dim // 2

    def scale_shift(self, net: nn.Module, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """(log-scale, shift) of the half that ``net`` transforms, from the other half ``u`` and ``h``."""
        raise NotImplementedError

    def transform(self, net: nn.Module, u: Tensor, h: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """The half ``x`` scaled and shifted by ``net`` ([u; h]): x e^s + t, and its log|det J| (the sum of s)."""
        s, t = self.scale_shift(net, u, h)
        return x * s.exp() + t, s.sum(1)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        # split, not two slices: its backward is one cat, where each slice's is a zeroed full-width tensor.
        a, b = x.split((self.split, x.shape[1] - self.split), dim=1)
        b, logdet1 = self.transform(self.net1, a, h, b)
        a, logdet2 = self.transform(self.net2, b, h, a)
        return torch.cat([a, b], dim=1), logdet1 + logdet2

    def reverse(self, y: Tensor, h: Tensor) -> Tensor:
        a, b = y.split((self.split, y.shape[1] - self.split), dim=1)
        s, t = self.scale_shift(self.net2, b, h)
        a = (a - t) * (-s).exp()
        s, t = self.scale_shift(self.net1, a, h)
        b = (b - t) * (-s).exp()
        return torch.cat([a, b], dim=1)


class DoubleAffineCoupling(HalfCouplings):
    """net2net's coupling: separate s (log-scale, tanh-bounded) and t (shift) nets per half, run as one
    PairedMLP per half."""

    def __init__(self, dim: int, embedding_dim: int, hidden_dim: int, depth: int) -> None:
        super().__init__()
        self.split = dim // 2
        rest = dim - self.split
        self.net1 = PairedMLP(self.split + embedding_dim, hidden_dim, depth, rest)
        self.net2 = PairedMLP(rest + embedding_dim, hidden_dim, depth, self.split)

    def scale_shift(self, net: nn.Module, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return net(torch.cat([u, h], dim=1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Read checkpoints of n2n before PairedMLP (nets s1, t1, s2, t2 as nn.Sequential): stack them."""
        for net, (s, t) in (("net1", ("s1", "t1")), ("net2", ("s2", "t2"))):
            linear = sorted({int(k.split(".")[-2]) for k in state_dict if k.startswith(f"{prefix}{s}.")})
            for i, j in enumerate(linear):
                for name, stacked in (("weights", "weight"), ("biases", "bias")):
                    pair = [state_dict.pop(f"{prefix}{side}.{j}.{stacked}") for side in (s, t)]
                    state_dict[f"{prefix}{net}.{name}.{i}"] = (
                        torch.stack([w.T for w in pair]) if stacked == "weight" else torch.stack(pair)[:, None]
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def soft_clamp(s: Tensor, clamp: float) -> Tensor:
    """clamp * 2/pi * atan(pi/2 * s / clamp): slope 1 at 0 (the identity for small log-scales), smooth,
    bounded to (-clamp, clamp), like FrEIA's affine clamping (whose slope at 0 is 2/pi). tanh bounds a
    log-scale to (-1, 1) and already bends it at 0.5; this lets one coupling scale by up to e^clamp
    where the data asks for it, and no further. Its slope is 1 / (1 + (pi/2 * s / clamp)^2)."""
    return torch.atan(s * (math.pi / 2 / clamp)).mul_(clamp * 2 / math.pi)


class ClampedAffine(torch.autograd.Function):
    """(x e^s + t, the sum of s) with s = soft_clamp(raw): a glow half-coupling's transform, with a
    hand-written backward.

    Why: above a few thousand target dims the step is memory-bound, each elementwise pass over a
    [batch, dim / 2] half costing alike. Autograd's chain of the eight ops makes 8 passes forward and
    about 10 backward; this makes 5 and 4 (the slope of soft_clamp is 1 / (1 + (k raw)^2); e^s is kept
    from the forward). The same function: tested against autograd's gradient, in double.
    ``setup_context`` and the generated vmap rule let torch.func (jacrev, vmap) and torch.compile see
    through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, raw: Tensor, t: Tensor, clamp: float) -> tuple[Tensor, Tensor, Tensor]:
        s = soft_clamp(raw, clamp)
        logdet = s.sum(-1)
        scale = s.exp_()
        return torch.addcmul(t, x, scale), logdet, scale

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, raw, _, clamp = inputs
        ctx.save_for_backward(x, raw, output[2])
        ctx.mark_non_differentiable(output[2])  # e^s: an output only to be saved (setup_context sees no locals)
        ctx.set_materialize_grads(False)  # so e^s's gradient is None, not a zeroed half
        ctx.k = math.pi / 2 / clamp

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None, _: None) -> tuple[Tensor, ...]:  # noqa: ANN001
        x, raw, scale = ctx.saved_tensors
        grad_y = torch.zeros_like(x) if grad_y is None else grad_y
        grad_x = grad_y * scale
        # d/ds of x e^s + t, and of the sum of s; then through the clamp
        grad_s = grad_x * x if grad_logdet is None else torch.addcmul(grad_logdet.unsqueeze(-1), grad_x, x)
        return grad_x, grad_s.div_(torch.addcmul(raw.new_ones(()), raw, raw, value=ctx.k**2)), grad_y, None


class GlowCoupling(HalfCouplings):
    """Two affine half-couplings like ``DoubleAffineCoupling``, but each with ONE subnet that gives both
    the log-scale and the shift (Glow; FrEIA's ``AllInOneBlock``), the log-scale soft-clamped.

    Why: at equal parameters one net per half buys about twice the blocks of net2net's separate s and
    t nets, and the shift and scale share what the net learns of the condition. The subnets' last
    layer starts at zero, so every block starts as the identity and a deep flow trains from step one.
    """

    CLAMP = 2.0

    def __init__(self, dim: int, embedding_dim: int, hidden_dim: int, depth: int) -> None:
        super().__init__()
        self.split = dim // 2
        rest = dim - self.split
        self.net1 = mlp(self.split + embedding_dim, hidden_dim, depth, 2 * rest)
        self.net2 = mlp(rest + embedding_dim, hidden_dim, depth, 2 * self.split)
        for net in (self.net1, self.net2):
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def raw_shift(self, net: nn.Module, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """The net's output for [u; h]: the log-scale before its clamp, and the shift."""
        raw, t = net(torch.cat([u, h], dim=1)).chunk(2, dim=1)
        return raw, t

    def scale_shift(self, net: nn.Module, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        raw, t = self.raw_shift(net, u, h)
        return soft_clamp(raw, self.CLAMP), t

    def transform(self, net: nn.Module, u: Tensor, h: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        y, logdet, _ = ClampedAffine.apply(x, *self.raw_shift(net, u, h), self.CLAMP)
        return y, logdet


class Permute(torch.autograd.Function):
    """x[:, perm], whose backward gathers the gradient through the inverse permutation.

    Why: autograd's backward of indexing is index_put with accumulation (an index may repeat), which
    on a CPU is the slowest pass of a wide step; a permutation hits each column once, so the inverse
    gather is the same gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        return torch.gather(x, -1, perm.expand_as(x))  # x[..., perm]; measured 2.1x faster at 65,536 dims

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        perm, inverse = ctx.saved_tensors
        return Permute.apply(grad, inverse, perm), None, None


class Shuffle(nn.Module):
    """A fixed permutation of the dimensions, so that each coupling splits a different pair of halves.
    Seeded by the block index: the same config always builds the same flow."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        perm = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return Permute.apply(x, self.perm, self.inverse_perm), x.new_zeros(x.shape[0])

    def reverse(self, y: Tensor) -> Tensor:
        return Permute.apply(y, self.inverse_perm, self.perm)


# Coupling types by name (FlowConfig.coupling): each is built as cls(dim, embedding_dim, hidden_dim, depth)
# and has forward(x, h) -> (y, log|det J|) and reverse(y, h) -> x (a HalfCouplings subclass gets both).
COUPLINGS: dict[str, type[nn.Module]] = {"affine": DoubleAffineCoupling, "glow": GlowCoupling}


EMBEDDERS = ("linear", "mlp")
TRANSLATOR_KINDS = ("coupling", "continuous")  # built by cinn.translators.build_flow
SOLVERS = ("euler", "midpoint", "heun")  # cinn.continuous.integrate
EMBEDDING_RANGE = (64, 512)  # the default condition embedding: the target's size, clamped to this range
NET2NET_SIZES = {"n_flows": 24, "hidden_dim": 1024, "velocity_width": 512}  # what an unsized config builds


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """The shape of a flow, less the two latent sizes (they come from the view).

    n2n-train sizes the blocks and widths a config leaves open to its view (``train.sizing``); a flow
    built without a view gets net2net's sizes (24 blocks, hidden 1024, depth 2: ``NET2NET_SIZES``), as
    the paper's recipes (configs/recipes) name them. The condition embedder and the coupling default
    to n2n's measured-better ``linear`` and ``glow``, and ``embedder="mlp", coupling="affine"`` builds
    net2net's own architecture."""

    # None: n2n-train sizes the translator to its view (train.sizing); a flow built without one is net2net's.
    n_flows: int | None = setting(None, "Blocks of [ActNorm, coupling, shuffle].  [default: sized to the view's "
                                        "train pairs; 24, net2net's, where there is none]", min=1)
    hidden_dim: int | None = setting(None, "Width of the coupling nets.  [default: sized to the view's train pairs; "
                                           "1024, net2net's, where there is none]", min=1)
    hidden_depth: int = setting(2, "Hidden layers of the coupling nets (net2net: 2, i.e. four Linear layers).",
                                min=0)
    # net2net's embedding is the target's size (268 for BigGAN): small targets starve of condition that way
    # (measured: +0.4 nats/dim at dim 8), and large ones (an SD-VAE's 4096) would grow every coupling net's
    # input by 4096 for a condition that a 512-wide embedding carries (CLIP's own width).
    embedding_dim: int | None = setting(None, "Size of the condition embedding every coupling net sees.  "
                                              f"[default: the target dim, within {EMBEDDING_RANGE}]", min=1)
    # Measured (bench.freia_peer, Gaussian law, 300 steps): net2net's MLP embedder 1.58 bits/dim held out,
    # one Linear 1.31, truth 1.21. The coupling nets are MLPs already; an MLP in front of them only makes
    # the condition's linear part (most of what a latent says about another) harder to pass on.
    embedder: str = setting("linear", "How the condition becomes the embedding every coupling net sees.  linear: "
                                      "one Linear layer; mlp: net2net's MLP (--embedder-depth, --embedder-norm).",
                            choices=EMBEDDERS)
    embedder_depth: int = setting(2, "Hidden layers of the mlp embedder.", min=0)
    # net2net's conditioning_hidden_dim (256 in its shipped configs); None keeps the embedding's width, which
    # is what n2n built before the field existed, so older checkpoints read as they were.
    embedder_hidden_dim: int | None = setting(None, "Width of the mlp embedder's hidden layers (net2net: "
                                                    "conditioning_hidden_dim).  [default: the embedding dim]", min=1)
    embedder_norm: str = setting(
        "layer", "Normalisation in the mlp embedder. net2net's batch makes a sample's embedding depend on "
                 "its batch and breaks at batch size 1 (translating one caption); layer trains as well.",
        choices=NORMS)
    # Measured (bench.freia_peer, equal parameters, same batches): glow reaches a lower held-out NLL than
    # affine on the Gaussian law and on the demo's image -> text view, and gets there sooner.
    coupling: str = setting("glow", "Coupling of every block; glow: one net per half for log-scale and shift, "
                                    "soft-clamped log-scales, identity at the start (Glow, FrEIA); affine: net2net's "
                                    "double affine coupling (separate s and t nets, tanh-bounded log-scales).",
                            choices=tuple(COUPLINGS))

    # Measured: on a view with strong linear structure (96-d text hashes -> 8x8 thumbnails) a flow started at
    # N(0, I) stayed 4.7 bits/dim above the linear-Gaussian law after 600 steps; started at that law it
    # cannot be worse than it at step 0, and training only improves on it.
    start_from_floor: bool = setting(
        True, "Start at the linear-Gaussian law p(target | source) fitted on the train pairs: a conditional affine "
              "first stage (mean W c + b, whitened by the residuals' Cholesky factor), trainable for the coupling "
              "flow, the source of the paths for the continuous one. Off: start at N(0, I), as net2net.")
    # Measured (docs/benchmarks.md, "Fidelity and diversity"): on the demo's image -> text view the linear law's
    # translator stayed far below n2n-eval's MLP at every temperature; started at the MLP's law it is that MLP at
    # temperature 0 and the full distribution at 1.
    base: str = setting("linear", "The mean of the law a translator starts from (--start-from-floor). linear: ridge "
                                  "regression W c + b; mlp: an MLP regression (--base-width) fitted first, so that "
                                  "temperature 0 is its prediction, refined.", choices=BASES)
    base_width: int = setting(512, "Width of the MLP mean of --base mlp (two hidden layers).", min=1)
    base_steps: int = setting(2000, "Training steps of the MLP mean of --base mlp (n2n-eval's MLP baseline: 2000).",
                              min=1)
    law: str = setting("auto", "The law's covariance. full: d x d (its Cholesky factor in the first stage); lowrank: "
                               "low rank plus diagonal, O(d x --law-rank) (cinn.lowrank_gaussian); auto: full up to "
                               f"{FULL_WIDTH} target dims, lowrank above.", choices=LAWS)
    law_rank: int = setting(RANK, "Principal directions of the residuals a lowrank law keeps.", min=1)
    translator: str = setting(
        "coupling", "The kind of invertible translator. coupling: the cINN of coupling blocks, trained by maximum "
                    "likelihood (net2net); continuous: an ODE whose velocity net v(x, t, c) is trained by flow "
                    "matching (--velocity-*, --ode-steps, --solver).", choices=TRANSLATOR_KINDS)
    velocity_blocks: int = setting(3, "Residual blocks of the continuous translator's velocity net.", min=1)
    velocity_width: int | None = setting(None, "Width of the continuous translator's velocity net.  [default: "
                                               "sized to the view's train pairs; 512 where there is none]", min=1)
    ode_steps: int = setting(20, "Steps of the ODE solver (continuous translator): the held-out NLL's and, unless "
                                 "n2n-translate says otherwise, sampling's.", min=1)
    solver: str = setting("heun", "ODE solver of the continuous translator (fixed steps): euler, midpoint or heun "
                                  "(two velocity evaluations a step, second order).", choices=SOLVERS)
    cond_dropout: float = setting(0.0, "Fraction of training pairs whose condition the continuous translator sees "
                                       "as 'none' (a learned null embedding): what classifier-free guidance "
                                       "(--guidance at sampling) needs.", min=0, below=1)

    def __post_init__(self) -> None:
        check_fields(self)


# What a checkpoint header written before a field existed meant by its absence (not today's default).
LEGACY = {"coupling": "affine", "embedder": "mlp", "start_from_floor": False, "translator": "coupling", "law": "full"}


def upgrade_header(model: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``model`` header of any n2n version, with every field an older version did not write
    set to what that version built."""
    return {**LEGACY, **model}


def shape_of(cls: str, kind: str, config: FlowConfig | None, options: dict[str, Any]) -> FlowConfig:
    """The shape of translator class ``cls`` (of kind ``kind``): its ``config=``, or FlowConfig made of its
    keyword ``options`` (both kinds take either, as flow libraries do). Both at once is a TypeError naming the
    keywords; a config or keyword of the other kind a ValueError, so that a translator can never record
    (``to_dict``) a kind it is not, and be rebuilt from its checkpoint as the other."""
    if config is not None and options:
        raise TypeError(f"{cls}: give config= or FlowConfig's fields as keywords, not both ({', '.join(options)})")
    shape = config or FlowConfig(**{"translator": kind, **options})
    if shape.translator != kind:
        raise ValueError(f"{cls} is the {kind} translator, but its config names translator={shape.translator!r}: "
                         f"give translator={kind!r}, or build_flow(dim, cond_dim, config) for the kind a config names")
    return shape


def sized(dim: int, config: FlowConfig) -> FlowConfig:
    """``config`` with its embedding width resolved for a target of ``dim``, and the sizes it leaves open
    (where no view sized them: ``train.sizing``) at net2net's."""
    low, high = EMBEDDING_RANGE
    open_sizes = {name: value for name, value in NET2NET_SIZES.items() if getattr(config, name) is None}
    return dataclasses.replace(config, embedding_dim=config.embedding_dim or min(max(dim, low), high), **open_sizes)


def low_rank(dim: int, law: str) -> bool:
    """Whether a target of ``dim`` dims gets the low-rank law (``FlowConfig.law``)."""
    return law == "lowrank" or (law == "auto" and dim > FULL_WIDTH)


def first_stage(dim: int, cond_dim: int, config: FlowConfig) -> LinearGaussianStage | LowRankStage | None:
    """The stage that sets a translator on its law (``config.start_from_floor``; its mean ``config.base``, its
    covariance ``config.law``)."""
    if not config.start_from_floor:
        return None
    if low_rank(dim, config.law):
        if config.base == "mlp":
            raise ValueError(f"--base mlp has a full covariance, and a target of {dim} dims gets the low-rank law: "
                             f"give --base linear, or --law full where {dim} x {dim} fits")
        return LowRankStage(dim, cond_dim, config.law_rank)
    return LinearGaussianStage(dim, cond_dim, config.base_width if config.base == "mlp" else None)


def make_embedder(cond_dim: int, config: FlowConfig) -> nn.Module:
    """The condition embedder (``config.embedder``), both translator kinds': c [B, cond_dim] -> h [B, embedding_dim]."""
    width = config.embedding_dim
    if config.embedder == "linear":
        return nn.Linear(cond_dim, width)
    return mlp(cond_dim, config.embedder_hidden_dim or width, config.embedder_depth, width, norm=config.embedder_norm)


class FlowBlock(nn.Module):
    """ActNorm -> coupling -> Shuffle."""

    def __init__(self, dim: int, config: FlowConfig, seed: int) -> None:
        super().__init__()
        self.norm = ActNorm(dim)
        self.coupling = COUPLINGS[config.coupling](dim, config.embedding_dim, config.hidden_dim, config.hidden_depth)
        self.shuffle = Shuffle(dim, seed)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        x, ld_norm = self.norm(x)
        x, ld_coupling = self.coupling(x, h)
        x, _ = self.shuffle(x)
        return x, ld_norm + ld_coupling

    def reverse(self, y: Tensor, h: Tensor) -> Tensor:
        return self.norm.reverse(self.coupling.reverse(self.shuffle.reverse(y), h))


class ConditionalFlow(nn.Module):
    """p(x | c) as an invertible map x -> z ~ N(0, I), conditioned on c through an embedding.

    Args:
        dim: size of the target latent x (what is generated).
        cond_dim: size of the condition c (the source expert's latent).
        config: the flow's shape as a ``FlowConfig``.
        **options: or its fields as keywords, as flow libraries take them
            (``ConditionalFlow(268, 768, n_flows=24, hidden_dim=1024)``); the rest at FlowConfig's defaults.
            ``self.config`` holds the shape with ``embedding_dim`` resolved.
    """

    KIND = "coupling"  # FlowConfig.translator's name for it
    LOSS = "nll"  # ``loss`` is the exact NLL in nats per pair (logged as bits/dim)
    SAMPLING = ()  # what ``sample`` takes besides the temperature: nothing, a sample is one pass
    sampling = SAMPLING  # the same for every instance

    def __init__(self, dim: int, cond_dim: int, config: FlowConfig | None = None, **options: Any) -> None:
        super().__init__()
        self.config = sized(dim, shape_of(type(self).__name__, self.KIND, config, options))
        self.dim, self.cond_dim = dim, cond_dim
        self.embedder = make_embedder(cond_dim, self.config)
        # Before the blocks, on the raw condition: the law it starts from is linear in c, not in h.
        self.linear_stage = first_stage(dim, cond_dim, self.config)
        self.blocks = nn.ModuleList(FlowBlock(dim, self.config, seed=i) for i in range(self.config.n_flows))

    def to_dict(self) -> dict[str, Any]:
        """What rebuilds this flow (``from_dict``): both sizes and the resolved config; a checkpoint's
        ``model`` header."""
        return {"dim": self.dim, "cond_dim": self.cond_dim, **dataclasses.asdict(self.config)}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> ConditionalFlow:
        """A flow from ``dim``, ``cond_dim`` and any FlowConfig fields, the rest at today's defaults (a
        checkpoint's header goes through ``upgrade_header`` first)."""
        spec = dict(spec)
        return cls(spec.pop("dim"), spec.pop("cond_dim"), FlowConfig(**spec))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """A checkpoint written before the first stage was named ``linear_stage`` calls it ``floor``."""
        rename_old_stage(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, dim], c [B, cond_dim] -> z [B, dim], log|det dz/dx| [B]."""
        h = self.embedder(c)
        if self.linear_stage is not None:
            x, logdet = self.linear_stage(x, c)
        else:
            logdet = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, ld = block(x, h)
            logdet = logdet + ld
        return x, logdet

    def reverse(self, z: Tensor, c: Tensor) -> Tensor:
        """The exact inverse of forward: z [B, dim], c [B, cond_dim] -> x [B, dim]."""
        h = self.embedder(c)
        for block in reversed(self.blocks):
            z = block.reverse(z, h)
        return self.linear_stage.reverse(z, c) if self.linear_stage is not None else z

    def residual(self, x: Tensor, c: Tensor) -> Tensor:
        """v = f(x | c) [B, dim]: what x holds that c does not explain, in N(0, I)'s units; ``reverse(v, c2)``
        keeps it under another condition (the paper's modification through the residual). Exact: the same
        map as ``forward``, without the log-determinant."""
        return self(x, c)[0]

    def draw(self, size: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """The random inputs of ``loss`` for a batch of ``size`` (none: the NLL is exact)."""
        return ()

    def loss(self, x: Tensor, c: Tensor) -> Tensor:
        """The training objective: the mean NLL in nats of the batch."""
        return nll(*self(x, c)).mean()

    @torch.no_grad()
    def start_from(self, law: GaussianLaw) -> None:
        """Start at ``law``: the first stage set to it and every ActNorm at the identity (its data-dependent
        init would move the flow off the law). With glow couplings (identity at the start) the flow's NLL
        is then the law's."""
        self.linear_stage.start_from(law)
        for block in self.blocks:
            block.norm.initialized.fill_(True)
            block.norm.needs_init = False

    def sample(self, c: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Draw x ~ p(x | c): z ~ N(0, temperature^2 I), then reverse. One sample per row of c."""
        z = torch.randn(c.shape[0], self.dim, device=c.device, dtype=c.dtype, generator=generator)
        return self.reverse(temperature * z, c)

    @property
    def needs_init(self) -> bool:
        """True until the ActNorms have seen their first training batch."""
        return any(block.norm.needs_init for block in self.blocks)
