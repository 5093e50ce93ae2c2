"""The cINN: exact inverse, exact log-determinant, conditioning, ActNorm init, the loss helper."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from torch.func import jacrev, vmap

from n2n import N2NError
from n2n.cinn import ActNorm, ConditionalFlow, FlowConfig, bits_per_dim, nll
from n2n.cinn.flow import COUPLINGS, ClampedAffine, GlowCoupling, Permute, soft_clamp, upgrade_header


def initialised_flow(dim=12, cond_dim=7, n=256, seed=0, **kwargs):
    torch.manual_seed(seed)
    flow = ConditionalFlow(dim, cond_dim, FlowConfig(**kwargs))
    x, c = torch.randn(n, dim) * 3 + 1, torch.randn(n, cond_dim)
    flow.train()
    flow(x, c)  # ActNorm data-dependent init
    assert not flow.needs_init
    # Push the couplings away from identity: a test of an identity map proves nothing.
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow.eval(), x, c


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_reverse_inverts_forward_24_flows(coupling):
    flow, x, c = initialised_flow(dim=32, cond_dim=16, n_flows=24, hidden_dim=64, coupling=coupling)
    with torch.no_grad():
        z, _ = flow(x, c)
        x2 = flow.reverse(z, c)
    assert not torch.allclose(z, x, atol=1e-2)
    assert torch.allclose(x2, x, atol=1e-4), (x2 - x).abs().max()


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_odd_dimension_inverts(coupling):
    flow, x, c = initialised_flow(dim=7, cond_dim=3, n_flows=4, hidden_dim=16, coupling=coupling)
    with torch.no_grad():
        assert torch.allclose(flow.reverse(flow(x, c)[0], c), x, atol=1e-5)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_logdet_matches_autograd_jacobian(coupling):
    flow, x, c = initialised_flow(dim=6, cond_dim=3, n_flows=4, hidden_dim=32, coupling=coupling)
    flow = flow.double()
    x, c = x[:8].double(), c[:8].double()

    def f(xi, ci):
        return flow(xi[None], ci[None])[0][0]

    jac = vmap(jacrev(f))(x, c)  # [B, D, D]
    _, logdet = flow(x, c)
    expected = torch.linalg.slogdet(jac).logabsdet
    assert torch.allclose(logdet, expected, atol=1e-8), (logdet - expected).abs().max()


@pytest.mark.parametrize("outputs", ["both", "y", "logdet"])
def test_clamped_affine_has_autograds_gradient(outputs):
    """The glow transform's hand-written backward against autograd's, in double, for each output alone."""
    torch.manual_seed(0)
    x, raw, t = (torch.randn(5, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        raw.mul_(3)  # well into the clamp's bend
    weights = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)

    def objective(y, logdet):
        return (y * weights[0]).sum() * (outputs != "logdet") + (logdet * weights[1]).sum() * (outputs != "y")

    s = soft_clamp(raw, 2.0)
    expected = torch.autograd.grad(objective(x * s.exp() + t, s.sum(1)), (x, raw, t), allow_unused=True)
    y, logdet, _ = ClampedAffine.apply(x, raw, t, 2.0)
    assert torch.allclose(y, x * s.exp() + t) and torch.allclose(logdet, s.sum(1))
    got = torch.autograd.grad(objective(y, logdet), (x, raw, t), allow_unused=True)
    for name, g, e in zip(["x", "raw", "t"], got, expected, strict=True):
        g = torch.zeros_like(x) if g is None else g
        e = torch.zeros_like(x) if e is None else e
        assert torch.allclose(g, e, atol=1e-12), name
    assert torch.autograd.gradcheck(lambda *a: ClampedAffine.apply(*a, 2.0)[:2], (x, raw, t))


def test_permute_backward_is_the_inverse_gather():
    torch.manual_seed(0)
    perm = torch.randperm(9)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 9, dtype=torch.float64)
    y = Permute.apply(x, perm, torch.argsort(perm))
    assert torch.equal(y, x[:, perm])
    (grad,) = torch.autograd.grad((y * weight).sum(), x)
    assert torch.equal(grad, torch.autograd.grad((x[:, perm] * weight).sum(), x)[0])
    assert torch.autograd.gradgradcheck(lambda v: Permute.apply(v, perm, torch.argsort(perm)), (x,))


def test_condition_changes_z():
    flow, x, c = initialised_flow()
    with torch.no_grad():
        z1, _ = flow(x, c)
        z2, _ = flow(x, c + 1.0)
    assert (z1 - z2).abs().mean() > 1e-3


def test_actnorm_init_standardises_first_batch():
    norm = ActNorm(5)
    x = torch.randn(512, 5) * torch.tensor([0.1, 1, 3, 10, 100]) + torch.tensor([-5.0, 0, 2, 7, 1e3])
    y, logdet = norm(x)
    assert torch.allclose(y.mean(0), torch.zeros(5), atol=1e-4)
    assert torch.allclose(y.std(0), torch.ones(5), atol=1e-4)
    assert torch.allclose(logdet, -x.std(0).log().sum().expand(512), atol=1e-3)
    # The second batch does not re-initialise.
    y2, _ = norm(x * 2)
    assert not torch.allclose(y2.std(0), torch.ones(5), atol=1e-2)


def test_actnorm_keeps_a_constant_dimension_at_scale_one():
    # Glow's 1 / (std + eps) gave such a dimension a scale of 1e6: any later variation in it overflowed.
    norm = ActNorm(3)
    x = torch.randn(256, 3)
    x[:, 1] = 0.25
    y, _ = norm(x)
    assert norm.scale[1] == 1 and torch.allclose(y[:, 1], torch.zeros(256))
    y2, logdet = norm(torch.randn(8, 3))
    assert y2.abs().max() < 10 and torch.isfinite(logdet).all()


def test_actnorm_init_survives_state_dict_round_trip():
    flow, x, c = initialised_flow(n_flows=2, hidden_dim=16)
    fresh = ConditionalFlow(12, 7, FlowConfig(n_flows=2, hidden_dim=16))
    assert fresh.needs_init
    fresh.load_state_dict(flow.state_dict())
    assert not fresh.needs_init
    fresh.train()
    with torch.no_grad():
        assert torch.equal(fresh(x, c)[0], flow.train()(x, c)[0])


def test_sample_shape_and_temperature():
    flow, _, c = initialised_flow(n_flows=3, hidden_dim=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cold = flow.sample(c, temperature=0.0)
        warm = flow.sample(c, temperature=1.0, generator=g)
        again = flow.sample(c, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert warm.shape == (c.shape[0], 12)
    assert torch.equal(warm, again)
    # T=0 decodes z=0 for every row: it still depends on c, not on noise.
    assert torch.allclose(cold, flow.reverse(torch.zeros_like(cold), c))


@pytest.mark.parametrize("norm", ["layer", "batch", "none"])
def test_single_sample_batches_work_in_eval(norm):
    flow, _, c = initialised_flow(n_flows=2, hidden_dim=16, embedder="mlp", embedder_norm=norm)
    with torch.no_grad():
        assert flow.sample(c[:1]).shape == (1, 12)


def test_layer_norm_embedding_is_independent_of_the_batch():
    """The reason LayerNorm is the default: in training mode a sample's embedding must not depend
    on which other samples share its batch (BatchNorm's does)."""
    for norm, independent in [("layer", True), ("batch", False)]:
        flow, x, c = initialised_flow(n_flows=2, hidden_dim=16, embedder="mlp", embedder_norm=norm)
        flow.train()
        h_full = flow.embedder(c)[:4]
        h_part = flow.embedder(c[:4])
        assert torch.allclose(h_full, h_part, atol=1e-5) == independent, norm


def test_nll_of_standard_normal_is_the_gaussian_entropy():
    torch.manual_seed(0)
    z = torch.randn(200_000, 4)
    nats = nll(z, torch.zeros(len(z))).mean()
    assert abs(nats.item() - 2 * math.log(2 * math.pi * math.e)) < 0.02
    assert abs(bits_per_dim(nats, 4).item() - 0.5 * math.log2(2 * math.pi * math.e)) < 0.01


def test_net2net_size_parameter_count():
    net2net = FlowConfig(n_flows=24, hidden_dim=1024, hidden_depth=2, embedding_dim=268, coupling="affine",
                         embedder="mlp", start_from_floor=False)
    n = sum(p.numel() for p in ConditionalFlow(268, 768, net2net).parameters())
    # 24 blocks x 4 coupling nets of 4 Linear layers each + ActNorms + the embedder.
    net = lambda i, o: (i * 1024 + 1024) + 2 * (1024 * 1024 + 1024) + (1024 * o + o)  # noqa: E731
    embedder = (768 * 268 + 268 + 2 * 268) + 2 * (268 * 268 + 268 + 2 * 268) + (268 * 268 + 268)
    expected = 24 * (2 * net(134 + 268, 134) * 2 + 2 * 268) + embedder
    assert n == expected
    # Started from the linear-Gaussian law: W [268, 768], b, and the whitening's lower part and diagonal.
    floored = ConditionalFlow(268, 768, dataclasses.replace(net2net, start_from_floor=True))
    assert sum(p.numel() for p in floored.parameters()) == expected + 268 * 768 + 268 + 268 * 268 + 268


def test_a_checkpoint_with_separate_s_and_t_nets_still_loads():
    """n2n before PairedMLP saved each coupling's nets s1, t1, s2, t2 as nn.Sequential (Linear at
    0, 2, 4, ...): such a state dict loads into the stacked layout and computes the same flow."""
    torch.manual_seed(0)
    flow = ConditionalFlow(5, 3, FlowConfig(n_flows=2, hidden_dim=8, hidden_depth=1, coupling="affine"))
    flow(torch.randn(64, 5), torch.randn(64, 3))  # ActNorm init
    old = {}
    for key, value in flow.state_dict().items():
        parts = key.split(".")
        if ".net" not in key:
            old[key] = value
            continue
        prefix, net, kind, layer = ".".join(parts[:-3]), parts[-3], parts[-2], int(parts[-1])
        names = ("s1", "t1") if net == "net1" else ("s2", "t2")
        for i, name in enumerate(names):
            old[f"{prefix}.{name}.{2 * layer}.{'weight' if kind == 'weights' else 'bias'}"] = (
                value[i].T if kind == "weights" else value[i, 0])
    restored = ConditionalFlow(5, 3, FlowConfig(n_flows=2, hidden_dim=8, hidden_depth=1, coupling="affine"))
    restored.load_state_dict(old)
    x, c = torch.randn(10, 5), torch.randn(10, 3)
    flow.eval(), restored.eval()
    assert all(torch.equal(a, b) for a, b in zip(flow(x, c), restored(x, c), strict=True))


def test_a_flow_rebuilds_from_its_dict_and_from_a_header_of_before_flow_config():
    """``to_dict`` is a checkpoint's ``model`` header; headers written before FlowConfig hold the same
    keys less ``coupling`` and ``embedder`` (and n2n's own defaults resolved), and build the flow that
    version built (net2net's coupling and MLP embedder), not today's defaults."""
    flow, x, c = initialised_flow(n_flows=2, hidden_dim=16, coupling="affine", embedder="mlp", embedder_norm="none",
                                  start_from_floor=False)
    header = flow.to_dict()
    assert header == {"dim": 12, "cond_dim": 7, "n_flows": 2, "hidden_dim": 16, "hidden_depth": 2, "embedding_dim": 64,
                      "embedder": "mlp", "embedder_depth": 2, "embedder_hidden_dim": None, "embedder_norm": "none",
                      "coupling": "affine", "start_from_floor": False, "base": "linear", "base_width": 512,
                      "base_steps": 2000, "law": "auto", "law_rank": 64, "translator": "coupling", "velocity_blocks": 3,
                      "velocity_width": 512, "ode_steps": 20, "solver": "heun", "cond_dropout": 0.0}
    # as FlowConfig was written before coupling, embedder, embedder_hidden_dim and the continuous translator existed
    new = ("coupling", "embedder", "embedder_hidden_dim", "start_from_floor", "translator", "velocity_blocks",
           "velocity_width", "ode_steps", "solver", "cond_dropout")
    old = {k: v for k, v in header.items() if k not in new}
    assert isinstance(ConditionalFlow.from_dict(old).embedder, torch.nn.Linear)  # today's default
    for spec in (header, old):
        twin = ConditionalFlow.from_dict(upgrade_header(spec))
        assert twin.config == flow.config and (twin.dim, twin.cond_dim) == (12, 7)
        twin.load_state_dict(flow.state_dict())
        with torch.no_grad():
            assert torch.equal(twin.eval()(x, c)[0], flow(x, c)[0])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("n_flows", 0, "n_flows (--n-flows) = 0: must be an integer >= 1"),
    ("hidden_dim", 0, "hidden_dim (--hidden-dim) = 0: must be an integer >= 1"),
    ("hidden_depth", -1, "hidden_depth (--hidden-depth) = -1: must be an integer >= 0"),
    ("embedding_dim", 0, "embedding_dim (--embedding-dim) = 0: must be an integer >= 1"),
    ("embedder_depth", 1.5, "embedder_depth (--embedder-depth) = 1.5: must be an integer >= 0"),
    ("embedder_norm", "group", "embedder_norm (--embedder-norm) = 'group': must be one of layer, batch, none"),
    ("coupling", "spline", "coupling (--coupling) = 'spline': must be one of affine"),
    ("embedder", "attention", "embedder (--embedder) = 'attention': must be one of linear, mlp"),
])
def test_flow_config_refuses_values_out_of_range(field, value, message):
    with pytest.raises(N2NError, match=re.escape(message)):
        FlowConfig(**{field: value})


def test_flow_config_stores_numbers_as_plain_ints():
    """numpy integers (a notebook's sweep) pass and are stored as int, so a header serialises to JSON."""
    config = FlowConfig(n_flows=np.int64(3), hidden_dim=16.0)
    assert type(config.n_flows) is int and type(config.hidden_dim) is int
    assert json.loads(json.dumps(ConditionalFlow(4, 3, config).to_dict()))["n_flows"] == 3


@pytest.mark.parametrize(("dim", "width"), [(8, 64), (300, 300), (4096, 512)])
def test_default_embedding_is_the_target_size_within_64_to_512(dim, width):
    with torch.device("meta"):
        flow = ConditionalFlow(dim, 16, FlowConfig(n_flows=1, hidden_dim=8))
    assert flow.config.embedding_dim == width and flow.embedder.out_features == width


def test_glow_coupling_starts_as_the_identity_and_clamps_its_scales():
    coupling = GlowCoupling(6, 4, 16, 1)
    x, h = torch.randn(5, 6), torch.randn(5, 4)
    y, logdet = coupling(x, h)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(5))
    s = torch.tensor([-1e6, -2.0, 0.0, 1e-3, 2.0, 1e6])
    clamped = soft_clamp(s, 2.0)
    assert clamped.abs().max() <= 2.0 and clamped[3] == pytest.approx(1e-3, rel=1e-4)  # identity near 0
    assert torch.all(clamped.diff() >= 0)
