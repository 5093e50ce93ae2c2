"""net2net's configs and checkpoints in n2n, checked against net2net's function as its code defines it.

No net2net code is here: ``net2net_state`` lays random tensors out as net2net's ConditionalFlatCouplingFlow
names and shapes them, and ``net2net_forward`` / ``net2net_reverse`` compute what that flow computes
with them (BasicFullyConnectedNet's Linear / BatchNorm / LeakyReLU stacks, ActNorm on [B, C, 1, 1]
tensors, the double coupling that hands on its halves swapped, the stored shuffle). ``from_net2net``
must give a ConditionalFlow with the same forward, reverse and log-det.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

import n2n
from n2n.cinn.net2net import Net2NetError, flow_config, flow_params, from_net2net, net2net_options
from n2n.train.cli import main as n2n_train

# The flow parameters of net2net's shipped translation configs (model.params.flow_config.params)
SBERT_TO_BIGGAN256 = {"conditioning_dim": 768, "embedding_dim": 268, "conditioning_depth": 2, "n_flows": 24,
                      "in_channels": 268, "hidden_dim": 1024, "hidden_depth": 2, "activation": "none",
                      "conditioner_use_bn": True}
SBERT_TO_AE_COCO256 = {"conditioning_dim": 1024, "embedding_dim": 256, "conditioning_depth": 2, "n_flows": 84,
                       "in_channels": 256, "hidden_dim": 1024, "hidden_depth": 2, "activation": "none",
                       "conditioner_use_bn": True}
SMALL = {"conditioning_dim": 5, "embedding_dim": 6, "conditioning_depth": 1, "conditioning_hidden_dim": 7,
         "n_flows": 3, "in_channels": 4, "hidden_dim": 9, "hidden_depth": 1, "activation": "none",
         "conditioner_use_bn": True}


def as_config(params: dict, batch_size: int = 16, base_lr: float = 4.5e-6) -> dict:
    """A net2net translation config around flow parameters, as net2net's YAML files are laid out."""
    return {"model": {"base_learning_rate": base_lr, "target": "net2net.models.flows.flow.Net2NetFlow",
                      "params": {"flow_config": {"target": "net2net.modules.flow.flatflow.ConditionalFlatCouplingFlow",
                                                 "params": params}}},
            "data": {"target": "translation.DataModuleFromConfig", "params": {"batch_size": batch_size}}}


def net_layers(depth: int, bn: bool) -> list[str]:
    """BasicFullyConnectedNet's nn.Sequential: Linear, (BatchNorm1d), LeakyReLU, depth x the same, Linear."""
    unit = ["linear", *(["bn"] if bn else []), "lrelu"]
    return [*unit * (depth + 1), "linear"]


def fc_state(prefix: str, sizes: list[int], depth: int, bn: bool, generator: torch.Generator) -> dict:
    state, widths = {}, iter(zip(sizes[:-1], sizes[1:], strict=True))
    for k, kind in enumerate(net_layers(depth, bn)):
        if kind == "linear":
            d_in, d_out = next(widths)
            weight = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
            state[f"{prefix}{k}.weight"] = weight / d_in ** 0.5
            state[f"{prefix}{k}.bias"] = 0.1 * torch.randn(d_out, generator=generator, dtype=torch.float64)
        elif kind == "bn":
            width = state[f"{prefix}{k - 1}.bias"].shape[0]
            state |= {f"{prefix}{k}.weight": 1 + 0.1 * torch.randn(width, generator=generator, dtype=torch.float64),
                      f"{prefix}{k}.bias": 0.1 * torch.randn(width, generator=generator, dtype=torch.float64),
                      f"{prefix}{k}.running_mean": torch.randn(width, generator=generator, dtype=torch.float64),
                      f"{prefix}{k}.running_var": 0.5 + torch.rand(width, generator=generator, dtype=torch.float64),
                      f"{prefix}{k}.num_batches_tracked": torch.tensor(7)}
    return state


def net2net_state(p: dict, seed: int = 0) -> dict:
    """Random tensors under the names and shapes of net2net's ConditionalFlatCouplingFlow with params ``p``."""
    g = torch.Generator().manual_seed(seed)
    c, e, hid = p["in_channels"], p["embedding_dim"], p["hidden_dim"]
    emb_hidden = p.get("conditioning_hidden_dim", 256)
    state = fc_state("embedder.main.", [p["conditioning_dim"], *[emb_hidden] * (p["conditioning_depth"] + 1), e],
                     p["conditioning_depth"], p["conditioner_use_bn"], g)
    for i in range(p["n_flows"]):
        block = f"sub_layers.{i}."
        state[block + "norm_layer.loc"] = 0.3 * torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64)
        state[block + "norm_layer.scale"] = 1 + 0.2 * torch.rand(1, c, 1, 1, generator=g, dtype=torch.float64)
        state[block + "norm_layer.initialized"] = torch.tensor(1, dtype=torch.uint8)
        sizes = [c // 2 + e, *[hid] * (p["hidden_depth"] + 1), c // 2]
        for side in ("s", "t"):
            for j in range(2):
                state |= fc_state(f"{block}coupling.{side}.{j}.main.", sizes, p["hidden_depth"], False, g)
        idx = torch.randperm(c, generator=g)
        state[block + "shuffle.forward_shuffle_idx"] = idx
        state[block + "shuffle.backward_shuffle_idx"] = torch.argsort(idx)
    return state


def run_fc(state: dict, prefix: str, x: torch.Tensor, depth: int, bn: bool, tanh: bool = False) -> torch.Tensor:
    for k, kind in enumerate(net_layers(depth, bn)):
        if kind == "linear":
            x = F.linear(x, state[f"{prefix}{k}.weight"], state[f"{prefix}{k}.bias"])
        elif kind == "bn":  # eval mode: the running statistics
            x = F.batch_norm(x, state[f"{prefix}{k}.running_mean"], state[f"{prefix}{k}.running_var"],
                             state[f"{prefix}{k}.weight"], state[f"{prefix}{k}.bias"], False, 0.0, 1e-5)
        else:
            x = F.leaky_relu(x)
    return torch.tanh(x) if tanh else x


def coupling_nets(state: dict, block: str, j: int, u: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (run_fc(state, f"{block}coupling.s.{j}.main.", u, depth, False, tanh=True),
            run_fc(state, f"{block}coupling.t.{j}.main.", u, depth, False))


def net2net_forward(state: dict, p: dict, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = run_fc(state, "embedder.main.", cond, p["conditioning_depth"], p["conditioner_use_bn"])
    half, logdet = p["in_channels"] // 2, torch.zeros(len(x), dtype=x.dtype)
    for i in range(p["n_flows"]):
        block = f"sub_layers.{i}."
        scale, loc = state[block + "norm_layer.scale"].flatten(), state[block + "norm_layer.loc"].flatten()
        x, logdet = scale * (x + loc), logdet + scale.abs().log().sum()
        for j in range(2):  # the second pass sees the halves swapped, and leaves them so
            if j == 1:
                x = torch.cat([x[:, half:], x[:, :half]], dim=1)
            keep, apply = x[:, :half], x[:, half:]
            s, t = coupling_nets(state, block, j, torch.cat([keep, h], dim=1), p["hidden_depth"])
            x, logdet = torch.cat([keep, apply * s.exp() + t], dim=1), logdet + s.sum(1)
        x = x[:, state[block + "shuffle.forward_shuffle_idx"]]
    return x, logdet


def net2net_reverse(state: dict, p: dict, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    h = run_fc(state, "embedder.main.", cond, p["conditioning_depth"], p["conditioner_use_bn"])
    half = p["in_channels"] // 2
    for i in reversed(range(p["n_flows"])):
        block = f"sub_layers.{i}."
        z = z[:, state[block + "shuffle.backward_shuffle_idx"]]
        for j in (1, 0):
            keep, apply = z[:, :half], z[:, half:]
            s, t = coupling_nets(state, block, j, torch.cat([keep, h], dim=1), p["hidden_depth"])
            z = torch.cat([keep, (apply - t) * (-s).exp()], dim=1)
            if j == 1:
                z = torch.cat([z[:, half:], z[:, :half]], dim=1)
        z = z / state[block + "norm_layer.scale"].flatten() - state[block + "norm_layer.loc"].flatten()
    return z


@pytest.mark.parametrize("bn", [True, False])
def test_from_net2net_computes_net2nets_function(bn):
    p = {**SMALL, "conditioner_use_bn": bn}
    state = net2net_state(p)
    flow = from_net2net({f"flow.{k}": v for k, v in state.items()}, as_config(p))
    assert next(flow.parameters()).dtype == torch.float64  # the checkpoint's precision, kept
    generator = torch.Generator().manual_seed(0)
    x, c = (torch.randn(11, d, dtype=torch.float64, generator=generator) for d in (4, 5))
    z, logdet = flow(x, c)
    z_ref, logdet_ref = net2net_forward(state, p, x, c)
    close = {"rtol": 0, "atol": 1e-12}
    assert torch.allclose(z, z_ref, **close) and torch.allclose(logdet, logdet_ref, **close)
    assert torch.allclose(flow.reverse(z, c), net2net_reverse(state, p, z_ref, c), **close)
    assert torch.allclose(flow.reverse(z, c), x, rtol=0, atol=1e-10)
    assert not flow.needs_init  # net2net's ActNorm statistics are kept, not re-estimated


@pytest.mark.parametrize("params", [SBERT_TO_BIGGAN256, SBERT_TO_AE_COCO256], ids=["sbert-to-biggan256",
                                                                                 "sbert-to-ae-coco256"])
def test_net2nets_shipped_configs_build_flows_of_net2nets_size(params):
    """Parameters of net2net's flow, counted from its layers: the embedder (BasicFullyConnectedNet with
    BatchNorm, hidden 256), then per block ActNorm (loc, scale) and four coupling nets."""
    c, e, h, d = params["in_channels"], params["embedding_dim"], params["hidden_dim"], params["hidden_depth"]
    hidden, depth = 256, params["conditioning_depth"]
    embedder = params["conditioning_dim"] * hidden + hidden + depth * (hidden * hidden + hidden) + hidden * e + e
    embedder += 2 * hidden * (depth + 1)  # BatchNorm1d weight and bias after each hidden Linear
    net = (c // 2 + e) * h + h + d * (h * h + h) + h * (c // 2) + c // 2
    expected = embedder + params["n_flows"] * (2 * c + 4 * net)
    with torch.device("meta"):
        flow = n2n.cinn.ConditionalFlow(c, params["conditioning_dim"], flow_config(flow_params(params)))
    assert sum(p.numel() for p in flow.parameters()) == expected


def test_a_net2net_config_as_n2n_train_options():
    options = net2net_options(as_config(SBERT_TO_BIGGAN256, batch_size=16))
    assert options["batch_size"] == 16 and options["lr"] == pytest.approx(4.5e-6 * 16)
    assert (options["source_dim"], options["target_dim"]) == (768, 268)
    assert (options["coupling"], options["embedder"], options["embedder_norm"]) == ("affine", "mlp", "batch")
    assert (options["embedder_hidden_dim"], options["embedding_dim"], options["n_flows"]) == (256, 268, 24)


@pytest.mark.parametrize(("change", "message"), [
    ({"activation": "lrelu"}, "activation: 'lrelu'"),
    ({"conditioning_option": "parallel"}, "conditioning_option: 'parallel'"),
    ({"conditioner_use_an": True, "conditioner_use_bn": False}, "conditioner_use_an"),
])
def test_what_n2n_does_not_build_is_refused_by_name(change, message):
    with pytest.raises(Net2NetError, match=message):
        net2net_options(as_config({**SBERT_TO_BIGGAN256, **change}))


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    from n2n.shards.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("shards"), "gaussian", n=800, src_dim=5, dst_dim=4)


def test_n2n_train_reads_net2nets_yaml_and_refuses_a_view_of_other_sizes(view, tmp_path, invoke):
    wrong = tmp_path / "biggan.yaml"
    wrong.write_text(yaml.safe_dump(as_config(SBERT_TO_BIGGAN256)))
    result = invoke(n2n_train, "--config", wrong, "--shards", view, "--out", tmp_path / "r")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "768 -> 268" in result.output and "5 -> 4" in result.output and not (tmp_path / "r").exists()


def test_a_run_starts_from_a_net2net_checkpoint(view, tmp_path, invoke):
    params = {**SMALL, "conditioner_use_bn": False}  # no running statistics for the one training step to move
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(as_config(params, batch_size=32)))
    checkpoint = tmp_path / "last.pt"
    state = {k: v.float() if v.is_floating_point() else v for k, v in net2net_state(params, seed=1).items()}
    torch.save({"state_dict": {f"flow.{k}": v for k, v in state.items()}}, checkpoint)
    result = invoke(n2n_train, "--config", config, "--shards", view, "--out", tmp_path / "r", "--init-from",
                    checkpoint, "--steps", 1, "--lr", 1e-30, "--device", "cpu", "--no-compile")
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (written["batch_size"], written["coupling"], written["embedder_hidden_dim"]) == (32, "affine", 7)
    from n2n.train.checkpoint import load_run

    trained = load_run(tmp_path / "r").flow.double().eval()
    reference = from_net2net(checkpoint, config).double()
    x, c = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    assert torch.allclose(trained(x, c)[0], reference(x, c)[0], atol=1e-5)  # one step at lr 1e-30: as loaded
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1


def test_a_checkpoint_that_does_not_fit_is_one_line(view, tmp_path, invoke):
    checkpoint = tmp_path / "last.pt"
    torch.save({"flow.sub_layers.0.norm_layer.loc": torch.zeros(1, 4, 1, 1)}, checkpoint)
    result = invoke(n2n_train, "--shards", view, "--out", tmp_path / "r", "--init-from", checkpoint, "--steps", 1,
                    "--device", "cpu", "--no-compile")
    assert result.exit_code == 2 and "--init-from" in result.output and len(result.output.strip().splitlines()) == 1
