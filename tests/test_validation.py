"""Every numeric option of every command is range-checked before any work starts.

Table-driven: ``BAD`` names, for each command, each numeric option with a value outside its range.
``test_the_table_covers_every_numeric_option`` walks the click commands themselves, so an option
added without a row here fails the suite. Each row must end in exit status 2, one line that names
the option, and nothing written.
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from n2n.evaluate.cli import main as n2n_eval
from n2n.extract.cli import main as n2n_extract
from n2n.extract.train_ae import main as n2n_train_ae
from n2n.shards.cli import main as n2n_shards
from n2n.train.cli import main as n2n_train
from n2n.translate.cli import main as n2n_translate

# command -> (click command, the arguments that make a run otherwise valid; {tmp} is a fresh folder)
COMMANDS = {
    "n2n-extract": (n2n_extract, ["--expert", "minilm", "--data", "shapes", "--out", "{tmp}/shards"]),
    "n2n-train": (n2n_train, ["--shards", "{tmp}/shards/view", "--out", "{tmp}/runs/x"]),
    "n2n-translate": (n2n_translate, ["--run", "{tmp}/runs/x", "--text", "a red circle", "--out", "{tmp}/g.png"]),
    "n2n-eval": (n2n_eval, ["--run", "{tmp}/runs/x", "--out", "{tmp}/eval.json"]),
    "n2n-train-ae": (n2n_train_ae, ["--data", "shapes", "--out", "{tmp}/experts/ae"]),
}
for name, sub in n2n_shards.commands.items():
    COMMANDS[f"n2n-shards {name}"] = (sub, ["--root", "{tmp}/shards"] if name == "synth" else [])

BAD: dict[str, dict[str, list[str]]] = {
    "n2n-extract": {"--batch-size": ["0", "-3"], "--num-workers": ["-1"], "--limit": ["0", "-5"],
                    "--commit-every": ["-1"], "--nproc": ["0"]},
    "n2n-train": {"--steps": ["0"], "--batch-size": ["0"], "--lr": ["-1", "0"], "--n-flows": ["0"],
                  "--hidden-dim": ["0"], "--hidden-depth": ["-1"], "--embedder-depth": ["-1"], "--embedding-dim": ["0"],
                  "--target-noise": ["-0.1"],
                  "--holdout": ["-0.1", "1", "1.5"], "--eval-every": ["0"], "--seed": ["-1"], "--nproc": ["0"],
                  "--eval-rows": ["0"], "--log-images": ["-1"], "--log-every": ["0"], "--source-dim": ["0"],
                  "--target-dim": ["-2"],
                  "--embedder-hidden-dim": ["0"], "--velocity-blocks": ["0"], "--velocity-width": ["0"],
                  "--ode-steps": ["0"], "--cond-dropout": ["-0.1", "1"], "--base-width": ["0"],
                  "--base-steps": ["0"], "--law-rank": ["0"]},
    "n2n-translate": {"-n": ["0"], "--temperature": ["-1"], "--seed": ["-1"], "--steps": ["0"], "--guidance": ["-1"]},
    "n2n-eval": {"--samples": ["0", "5000"], "--temperature": ["-1", "nan"], "--max-rows": ["0"], "--seed": ["-1"],
                 "--baseline-steps": ["0"]},
    "n2n-train-ae": {"--limit": ["0", "-5"], "--image-size": ["0"], "--latent-dim": ["0"], "--steps": ["0"],
                     "--batch-size": ["0"], "--lr": ["0", "-1", "nan"], "--foreground-weight": ["-1"],
                     "--kl-weight": ["-1", "inf"],
                     "--seed": ["-1"]},
    "n2n-shards synth": {"--n": ["0"], "--src-dim": ["0"], "--dst-dim": ["0", "-3"], "--seed": ["-1"]},
}


def numeric_options(command: click.Command) -> list[str]:
    """The longest flag of every option that takes a number."""
    numeric = (click.types.IntParamType, click.types.FloatParamType)
    return sorted(max(p.opts, key=len) for p in command.params
                  if isinstance(p, click.Option) and isinstance(p.type, numeric) and not p.is_flag)


def test_the_table_covers_every_numeric_option():
    missing = {name: sorted(set(numeric_options(cmd)) - set(BAD.get(name, {})))
               for name, (cmd, _) in COMMANDS.items()}
    assert {k: v for k, v in missing.items() if v} == {}


ROWS = [(name, option, value) for name, options in BAD.items() for option, values in options.items()
        for value in values]


@pytest.mark.parametrize(("name", "option", "value"), ROWS, ids=[f"{n} {o} {v}" for n, o, v in ROWS])
def test_out_of_range_is_one_line_exit_2_and_nothing_written(name, option, value, tmp_path):
    command, args = COMMANDS[name]
    work = tmp_path / "work"
    work.mkdir()
    argv = [a.replace("{tmp}", str(work)) for a in args] + [f"{option}={value}" if option.startswith("--")
                                                             else option, *([] if option.startswith("--")
                                                                            else [value])]
    result = CliRunner().invoke(command, argv)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert option.lstrip("-").replace("-", "_") in lines[0] or option in lines[0], lines[0]
    assert "must be" in lines[0], lines[0]  # the allowed range, not some later failure
    assert list(work.iterdir()) == [], "nothing may be written"
