"""net2net's own flows in n2n: its translation configs as n2n options, its checkpoints as ConditionalFlows.

net2net (Rombach, Esser, Ommer 2020) describes a translator with an OmegaConf YAML whose
``model.params.flow_config`` builds ``ConditionalFlatCouplingFlow``; n2n's ``affine`` coupling with the
``mlp`` embedder is that flow, so its configs and weights carry over:

- ``net2net_options(yaml)``: the FlowConfig fields, both latent sizes, the batch size and the learning
  rate (net2net's base rate x batch size, on one GPU) of a net2net config; what it cannot express
  (an invertible leaky ReLU after ActNorm, a per-block conditioning layer, ActNorm in the embedder)
  is refused by name.
- ``from_net2net(checkpoint, config)``: a net2net checkpoint's flow as a ``ConditionalFlow`` that
  computes the same function. The mapping: net2net's tensors are [B, C, 1, 1] and its ActNorm's
  ``loc``/``scale`` [1, C, 1, 1]; its coupling has lists ``s`` and ``t`` of two nets each (``.main``, an
  nn.Sequential; the s nets end in a Tanh), which n2n's ``PairedMLP`` stacks as (s, t) per half; its
  coupling returns the halves swapped ([b', a']), which folds into the following permutation; the
  permutation is its stored ``forward_shuffle_idx``, never drawn again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from n2n.cinn.flow import ConditionalFlow, FlowConfig
from n2n.errors import N2NError
from n2n.options import register_config_dialect

FLOW_TARGET = "net2net.modules.flow.flatflow.ConditionalFlatCouplingFlow"
# ConditionalFlatCouplingFlow's own defaults, for keys a config leaves out
DEFAULTS = {"conditioning_option": "none", "activation": "lrelu", "conditioning_hidden_dim": 256,
            "conditioning_depth": 2, "conditioner_use_bn": False, "conditioner_use_an": False}
REQUIRED = ("in_channels", "conditioning_dim", "embedding_dim", "hidden_dim", "hidden_depth", "n_flows")


class Net2NetError(N2NError):
    """A net2net config or checkpoint that n2n cannot take; the message names the key and why."""


def is_net2net_config(data: Mapping[str, Any]) -> bool:
    """Whether a YAML mapping is a net2net translation config (``model.params.flow_config``)."""
    model = data.get("model")
    return isinstance(model, Mapping) and isinstance((model.get("params") or {}).get("flow_config"), Mapping)


def flow_params(data: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """``model.params.flow_config.params`` of a net2net config (or that mapping itself), with the flow's
    defaults filled in; a flow n2n does not build is a Net2NetError naming the key."""
    if is_net2net_config(data):
        flow = data["model"]["params"]["flow_config"]
        target = flow.get("target")
        if target != FLOW_TARGET:
            raise Net2NetError(f"{where}: model.params.flow_config.target is {target!r}; n2n reads {FLOW_TARGET}")
        data = flow.get("params") or {}
    params = {**DEFAULTS, **data}
    missing = [key for key in REQUIRED if key not in params]
    if missing:
        raise Net2NetError(f"{where}: the flow's {', '.join(missing)} missing from its flow_config params")
    refused = {"activation": ("none", "an invertible leaky ReLU after each ActNorm"),
               "conditioning_option": ("none", "a conditioning layer in every block")}
    for key, (wanted, what) in refused.items():
        if str(params[key]).lower() != wanted:
            raise Net2NetError(f"{where}: {key}: {params[key]!r} ({what}) is not in n2n's flow; {key}: "
                               f"{wanted!r} is (as every translation config net2net ships)")
    if params["conditioner_use_an"]:
        raise Net2NetError(f"{where}: conditioner_use_an: true (ActNorm in the embedder) is not in n2n's flow; "
                           "use conditioner_use_bn or neither")
    return params


def flow_config(params: Mapping[str, Any]) -> FlowConfig:
    """The FlowConfig of net2net's ConditionalFlatCouplingFlow with these (``flow_params``) parameters."""
    return FlowConfig(n_flows=params["n_flows"], hidden_dim=params["hidden_dim"], hidden_depth=params["hidden_depth"],
                      embedding_dim=params["embedding_dim"], embedder="mlp",
                      embedder_depth=params["conditioning_depth"],
                      embedder_hidden_dim=params["conditioning_hidden_dim"],
                      embedder_norm="batch" if params["conditioner_use_bn"] else "none", coupling="affine",
                      start_from_floor=False)


def net2net_options(data: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """A net2net translation config as n2n-train's options: FlowConfig's fields, ``source_dim`` and
    ``target_dim`` (the view must match them), and where the config sets them ``batch_size`` and ``lr``
    (``model.base_learning_rate`` x ``data.params.batch_size``, as net2net scales it on one GPU)."""
    params = flow_params(data, where)
    options: dict[str, Any] = dict(vars(flow_config(params)))
    options |= {"source_dim": params["conditioning_dim"], "target_dim": params["in_channels"]}
    batch = ((data.get("data") or {}).get("params") or {}).get("batch_size")
    base = (data.get("model") or {}).get("base_learning_rate")
    if batch is not None:
        options["batch_size"] = batch
        if base is not None:
            options["lr"] = float(base) * int(batch)
    return options


register_config_dialect(is_net2net_config, lambda data, path: net2net_options(data, f"net2net config {path}"))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise Net2NetError(f"net2net config {path}: cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise Net2NetError(f"net2net config {path}: not a mapping")
    return data


def load_state_dict(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The flow's tensors of a net2net checkpoint: a PyTorch-Lightning ``.ckpt`` (its ``state_dict``, the
    flow under ``flow.``), that state dict, or the flow's own; read with ``weights_only=True``."""
    if isinstance(checkpoint, Mapping):
        state = dict(checkpoint)
    else:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # an unpickling refusal, a missing or damaged file
            raise Net2NetError(
                f"net2net checkpoint {checkpoint}: not readable as tensors alone ({str(err).splitlines()[0]}); "
                "where it was written, save its state dict by itself: torch.save(torch.load(CKPT)['state_dict'], "
                "'flow.pt')") from None
    state = state.get("state_dict", state)
    if any(key.startswith("flow.") for key in state):
        state = {key.removeprefix("flow."): value for key, value in state.items() if key.startswith("flow.")}
    if not any(key.startswith("sub_layers.") for key in state):
        raise Net2NetError(f"net2net checkpoint {checkpoint if not isinstance(checkpoint, Mapping) else ''}: no "
                           "flow in it (no sub_layers.* tensors, under flow. or at the top)")
    return state


def check_shape(flow: torch.nn.Module) -> None:
    """A Net2NetError unless ``flow`` is built as net2net's flows are: coupling blocks from N(0, I), no first
    stage (net2net has none)."""
    if not isinstance(flow, ConditionalFlow) or flow.linear_stage is not None:
        raise Net2NetError("a net2net flow is a coupling translator that starts at N(0, I); train it with "
                           "--translator coupling --no-start-from-floor (its YAML through --config sets both)")


def n2n_state_dict(state: Mapping[str, torch.Tensor], flow: ConditionalFlow) -> dict[str, torch.Tensor]:
    """net2net's tensors of a ConditionalFlatCouplingFlow under ``flow``'s names and shapes."""
    check_shape(flow)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("embedder.main."):
            out["embedder." + key.removeprefix("embedder.main.")] = value
    half = flow.dim // 2
    for i in range(len(flow.blocks)):
        net2net, ours = f"sub_layers.{i}.", f"blocks.{i}."
        out[ours + "norm.loc"] = state[net2net + "norm_layer.loc"].reshape(-1)
        out[ours + "norm.scale"] = state[net2net + "norm_layer.scale"].reshape(-1)
        initialized = state.get(net2net + "norm_layer.initialized", torch.tensor(1))
        out[ours + "norm.initialized"] = torch.tensor(bool(initialized))
        for j, net in enumerate(("net1", "net2")):  # s[0], t[0] transform the second half; s[1], t[1] the first
            layers = sorted({int(k.split(".")[-2]) for k in state if k.startswith(f"{net2net}coupling.s.{j}.main.")
                             and k.endswith(".weight")})
            for n, layer in enumerate(layers):
                s_weight, s_bias, t_weight, t_bias = (state[f"{net2net}coupling.{side}.{j}.main.{layer}.{kind}"]
                                                      for side in ("s", "t") for kind in ("weight", "bias"))
                out[f"{ours}coupling.{net}.weights.{n}"] = torch.stack([s_weight.T, t_weight.T])
                out[f"{ours}coupling.{net}.biases.{n}"] = torch.stack([s_bias, t_bias])[:, None]
        # net2net's coupling hands on [b', a']; n2n's [a', b']: position k of net2net's shuffle reads
        # position (idx + half) mod dim of n2n's coupling output.
        perm = (state[net2net + "shuffle.forward_shuffle_idx"].long() + half) % flow.dim
        out[ours + "shuffle.perm"] = perm
        out[ours + "shuffle.inverse_perm"] = torch.argsort(perm)
    return out


def from_net2net(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
                 config: str | os.PathLike | Mapping[str, Any]) -> ConditionalFlow:
    """A net2net checkpoint's ConditionalFlatCouplingFlow as a ConditionalFlow that computes the same
    function (forward, reverse, log-det), in eval mode and in the checkpoint's float dtype.

    ``checkpoint``: a ``.ckpt`` or ``.pt`` path (read with ``weights_only=True``) or its state dict; the
    flow's tensors are found under ``flow.`` or at the top. ``config``: the net2net YAML the run was
    trained with (a path or its mapping), or its flow_config params. Odd target sizes do not arise:
    net2net's conditional coupling needs an even one.
    """
    data = read_yaml(config) if isinstance(config, str | os.PathLike) else dict(config)
    params = flow_params(data, str(config) if isinstance(config, str | os.PathLike) else "config")
    if params["in_channels"] % 2:
        raise Net2NetError(f"in_channels: {params['in_channels']} is odd; net2net's conditional coupling "
                           "splits an even size")
    state = load_state_dict(checkpoint)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    flow = ConditionalFlow(params["in_channels"], params["conditioning_dim"], flow_config(params)).to(dtype)
    mapped = n2n_state_dict(state, flow)
    try:
        flow.load_state_dict(mapped)
    except RuntimeError as err:
        raise Net2NetError(f"the checkpoint does not fit its config's flow: {str(err).splitlines()[1:3]}") from None
    return flow.eval()
