"""A run is a file: every command takes --config FILE.yaml, every run and store writes its resolved
config.yaml, the command line overrides the file, and each command's options are its API's, default
for default."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import click
import numpy as np
import pytest
import yaml

import n2n
from n2n.evaluate.api import EvalConfig
from n2n.evaluate.cli import main as n2n_eval
from n2n.extract.cli import main as n2n_extract
from n2n.extract.run import ExtractConfig
from n2n.extract.train_ae import TrainAEConfig
from n2n.extract.train_ae import main as n2n_train_ae
from n2n.options import field_default
from n2n.train.cli import main as n2n_train
from n2n.train.trainer import TrainConfig
from n2n.translate.cli import main as n2n_translate
from n2n.translate.pipeline import SamplingConfig, Translator

TRAIN = {"steps": 40, "n_flows": 2, "hidden_dim": 16, "eval_every": 20, "device": "cpu"}


@pytest.fixture(scope="module")
def view(tmp_path_factory) -> Path:
    from n2n.shards.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("shards"), "gaussian", n=1500, src_dim=6, dst_dim=4)


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def last_heldout(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["heldout_bpd"]


# ---------------------------------------------------------------- one option path: the command's defaults are the API's


def parsed(command: click.Command, args: list[str]) -> dict:
    """The values a command would run with, from its own parsing (callbacks applied), without running it."""
    with command.make_context(command.name or "cmd", args) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize(("command", "args", "configs"), [
    (n2n_extract, ["--expert", "minilm", "--data", "shapes"], [ExtractConfig]),
    (n2n_train, [], [TrainConfig, n2n.FlowConfig]),
    (n2n_eval, ["--run", "r"], [EvalConfig]),
    (n2n_translate, ["--run", "r"], [SamplingConfig]),
    (n2n_train_ae, [], [TrainAEConfig]),
], ids=["n2n-extract", "n2n-train", "n2n-eval", "n2n-translate", "n2n-train-ae"])
def test_every_option_default_is_the_apis(command, args, configs):
    values = parsed(command, args)
    required = {name for name in ("expert", "data")}
    for cls in configs:
        for f in dataclasses.fields(cls):
            if f.metadata.get("n2n", {}).get("cli", True) and f.name not in required:
                assert values[f.name] == field_default(f), f"{command.name} {f.name}"


def test_the_api_functions_take_the_configs_defaults():
    """Where an API function names an option itself, its default is the config's (and the command's)."""
    for method in (Translator.sample, Translator.translate):
        defaults = {k: p.default for k, p in inspect.signature(method).parameters.items()}
        assert all(defaults[f.name] == f.default for f in dataclasses.fields(SamplingConfig))
    train = inspect.signature(n2n.train.api.train).parameters
    cli = parsed(n2n_train, [])
    assert all(train[name].default == cli[name] for name in ("device", "compile", "stream", "resume"))


def test_the_flow_takes_its_config_as_keywords():
    flow = n2n.cinn.ConditionalFlow(4, 6, n_flows=2, hidden_dim=8, coupling="affine")
    assert (flow.config.n_flows, flow.config.hidden_dim, flow.config.coupling) == (2, 8, "affine")
    same = n2n.cinn.ConditionalFlow(4, 6, config=n2n.FlowConfig(n_flows=2, hidden_dim=8, coupling="affine"))
    assert same.config == flow.config
    with pytest.raises(n2n.N2NError, match="n_flows"):
        n2n.cinn.ConditionalFlow(4, 6, n_flows=0)
    with pytest.raises(TypeError, match="not both"):
        n2n.cinn.ConditionalFlow(4, 6, n2n.FlowConfig(), n_flows=2)


# ---------------------------------------------------------------- config files


def test_a_run_is_reproduced_from_its_config_yaml(view, tmp_path, invoke):
    config = write_yaml(tmp_path / "x.yaml", {"shards": str(view), **{k.replace("_", "-"): v for k, v in
                                                                        TRAIN.items()}})
    assert invoke(n2n_train, "--config", config, "--out", tmp_path / "x").exit_code == 0
    written = yaml.safe_load((tmp_path / "x" / "config.yaml").read_text())
    assert written["steps"] == 40 and written["coupling"] == "glow" and written["n2n_version"] == n2n.__version__
    assert set(written) >= {f.name for f in dataclasses.fields(TrainConfig)}  # defaults included
    result = invoke(n2n_train, "--config", tmp_path / "x" / "config.yaml", "--out", tmp_path / "y")
    assert result.exit_code == 0, result.output
    assert last_heldout(tmp_path / "y") == last_heldout(tmp_path / "x")  # the same run, exactly
    # The command line overrides the file; the API takes the same file.
    assert invoke(n2n_train, "--config", config, "--out", tmp_path / "z", "--steps", 20).exit_code == 0
    assert yaml.safe_load((tmp_path / "z" / "config.yaml").read_text())["steps"] == 20
    run = n2n.train(config=tmp_path / "x" / "config.yaml", out=tmp_path / "api", progress=False)
    assert last_heldout(run) == last_heldout(tmp_path / "x")
    # --resume against the file it wrote: the same settings, so nothing is refused.
    assert invoke(n2n_train, "--config", tmp_path / "x" / "config.yaml", "--resume", "--steps", 60).exit_code == 0


def test_a_store_is_made_again_from_its_config_yaml(tmp_path, invoke):
    config = write_yaml(tmp_path / "e.yaml", {"expert": "minilm", "data": "shapes", "limit": 6, "num-workers": 0,
                                              "dtype": "float32", "data_options": {"seed": 3}})
    assert invoke(n2n_extract, "--config", config, "--out", tmp_path / "a").exit_code == 0
    store = tmp_path / "a/shapes/minilm"
    written = yaml.safe_load((store / "config.yaml").read_text())
    assert written["data_options"] == {"seed": 3} and written["batch_size"] == 64
    again = n2n.extract(config=store / "config.yaml", out=tmp_path / "b", progress=False)
    assert np.array_equal(again.latents(), n2n.open_store(store).latents())
    assert n2n.open_store(store).meta["dataset"]["seed"] == 3


@pytest.mark.parametrize(("command", "args"), [
    (n2n_extract, []), (n2n_train, []), (n2n_eval, []), (n2n_translate, []), (n2n_train_ae, []),
], ids=["n2n-extract", "n2n-train", "n2n-eval", "n2n-translate", "n2n-train-ae"])
def test_an_unknown_key_is_one_line_naming_the_closest(command, args, tmp_path, invoke):
    config = write_yaml(tmp_path / "c.yaml", {"outt": 1})
    result = invoke(command, "--config", config, *args)
    assert result.exit_code == 2 and result.output.startswith("error:")
    assert len(result.output.strip().splitlines()) == 1 and "'outt'; did you mean 'out'?" in result.output
    assert list(tmp_path.iterdir()) == [config]


@pytest.mark.parametrize(("text", "message"), [
    ("steps: 0\n", "steps (--steps) = 0: must be an integer >= 1"),
    ("- 1\n- 2\n", "write a mapping of option names"),
    ("steps: [1\n", "not YAML"),
])
def test_bad_values_in_a_config_are_one_line_errors(text, message, view, tmp_path, invoke):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    result = invoke(n2n_train, "--config", config, "--shards", view, "--out", tmp_path / "r")
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_the_api_refuses_an_unknown_key_in_a_config(view, tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"n_flow": 2})
    with pytest.raises(n2n.N2NError, match="unknown option 'n_flow'; did you mean 'n_flows'"):
        n2n.train(view, config=config, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_demo_is_described_by_config_files():
    root = Path(__file__).resolve().parents[1]
    makefile = (root / "Makefile").read_text()
    for name in ("ae-shapes", "extract-minilm", "extract-ae", "minilm_ae", "ae_minilm"):
        assert f"$(DEMO)/{name}.yaml" in makefile
        assert yaml.safe_load((root / "configs" / "demo" / f"{name}.yaml").read_text())


def test_every_config_file_in_the_repository_is_one_its_command_takes():
    """configs/**/*.yaml: each file's keys are options of the command it is for (n2n-diagnose where it names a
    decoder, and its train_options n2n-train's; n2n-train where it names a view, n2n-extract where it names an
    expert, n2n-train-ae otherwise)."""
    from n2n.diagnose.cli import main as n2n_diagnose
    from n2n.options import check_names, option_name

    def names(command) -> set[str]:
        return {option_name(opt) for p in command.params for opt in p.opts} | {p.name for p in command.params}

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        values = n2n.options.read_config(path)
        if "decoder" in values:
            command = n2n_diagnose
            check_names(values.get("train_options") or {}, names(n2n_train), f"{path} train_options")
        else:
            command = n2n_train if "shards" in values else n2n_extract if "expert" in values else n2n_train_ae
        check_names(values, names(command), str(path))


@pytest.mark.parametrize("kind", ["coupling", "continuous"])
def test_a_translator_records_its_own_kind_and_refuses_the_others(kind):
    """Issue 34's defect: ContinuousFlow(config=FlowConfig()) recorded itself as a coupling flow, and was rebuilt
    from its checkpoint as one."""
    from n2n.cinn import flow_from_dict
    from n2n.cinn.translators import KINDS

    cls, other = KINDS[kind], next(k for k in KINDS if k != kind)
    small = {"n_flows": 2, "hidden_dim": 8, "velocity_width": 8, "velocity_blocks": 1}
    for flow in (cls(4, 3, config=n2n.FlowConfig(translator=kind, **small)), cls(4, 3, **small)):
        header = flow.to_dict()
        assert header["translator"] == kind
        rebuilt = flow_from_dict(header)
        assert type(rebuilt) is cls and rebuilt.to_dict() == header
    with pytest.raises(ValueError, match=f"is the {kind} translator, but its config names translator='{other}'"):
        cls(4, 3, config=n2n.FlowConfig(translator=other))
    with pytest.raises(ValueError, match=f"give translator='{kind}'"):
        cls(4, 3, translator=other)
