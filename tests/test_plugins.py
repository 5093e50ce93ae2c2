"""Plug-ins: experts and datasets that other distributions provide through entry points.

The example distribution (examples/n2n-example-plugin) is installed by pip into a folder of its own,
never into the project's environment, and used with that folder on PYTHONPATH, as by a user who
installed it: extract -> pair -> train -> translate through the commands and through the API. Broken
plug-ins are distributions written here by hand: a dist-info folder (METADATA, entry_points.txt)
beside the module it names.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import n2n
from n2n import plugins
from n2n.extract.datasets import DatasetError, ItemDataset, known_datasets, open_dataset
from n2n.extract.experts import Expert, ExpertError, known_experts, load_expert

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLE = REPO / "examples" / "n2n-example-plugin"
EXAMPLE_DIST = "n2n-example-plugin 0.1.0"
N2N_DIST = f"n2n {n2n.__version__}"
TINY = ["--steps", "10", "--n-flows", "2", "--hidden-dim", "16", "--batch-size", "16", "--eval-every", "10",
        "--device", "cpu"]


def env(site: Path | None) -> dict[str, str]:
    """The environment of a command: offline, with ``site`` (the plug-in's folder) on PYTHONPATH, or without."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**base, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **({"PYTHONPATH": str(site)} if site else {})}


def start(*args: str, cwd: Path, site: Path | None) -> subprocess.Popen:
    """One of the project's commands, started in the background."""
    return subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=cwd, env=env(site), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def command(*args: str, cwd: Path, site: Path | None) -> subprocess.CompletedProcess:
    """One of the project's commands, run to its end."""
    process = start(*args, cwd=cwd, site=site)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def ok(*processes: subprocess.Popen | subprocess.CompletedProcess) -> None:
    """Wait for each command; every one must succeed."""
    for process in processes:
        stderr = process.communicate(timeout=300)[1] if isinstance(process, subprocess.Popen) else process.stderr
        assert process.returncode == 0, stderr[-3000:]


def error_line(output: str) -> str:
    """The one ``error:`` line of a failed command; a traceback or a message over several lines fails."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
    return lines[0]


# ---------------------------------------------------------------- the example plug-in, installed


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example installed with pip --target (from a copy: pip builds in the source folder)."""
    tmp = tmp_path_factory.mktemp("example-plugin")
    shutil.copytree(EXAMPLE, tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(tmp / "site"), str(tmp / "src")],
                   check=True, capture_output=True)
    return tmp / "site"


@pytest.fixture(scope="module")
def project(site, tmp_path_factory) -> Path:
    """A project folder made by the commands alone: the plug-in's expert at two sides over the plug-in's
    dataset (both extractions at once), paired, and a tiny cINN trained from 4x4 to 8x8 thumbnails."""
    folder = tmp_path_factory.mktemp("project")
    ok(*(start("n2n-extract", "--expert", expert, "--data", "blocks", "--data-option", "count=32", "--num-workers",
               "0", "--device", "cpu", cwd=folder, site=site) for expert in ("pixels:4", "pixels:8")))
    ok(command("n2n-shards", "pair", "shards/blocks/pixels-4", "shards/blocks/pixels-8", "--name", "pixels",
               cwd=folder, site=site))
    ok(command("n2n-train", "--shards", "shards/pixels", "--out", "runs/pixels", *TINY, cwd=folder, site=site))
    with Image.new("RGB", (32, 32)) as image:
        image.paste((220, 40, 40), (0, 0, 16, 16))
        image.save(folder / "input.png")
    return folder


def test_stores_record_the_distribution_of_expert_and_dataset(project):
    meta = json.loads((project / "shards/blocks/pixels-8/meta.json").read_text())
    assert meta["expert"]["plugin"] == meta["dataset"]["plugin"] == EXAMPLE_DIST
    assert meta["expert"]["spec"] == "pixels:8@latent" and meta["expert"]["preprocess"]["side"] == 8


def test_translate_rebuilds_the_plugin_experts_from_the_run_alone(project, site):
    ok(command("n2n-translate", "--run", "runs/pixels", "--input", "input.png", "-n", "4", "--out", "grid.png",
               cwd=project, site=site))
    with Image.open(project / "grid.png") as grid:
        assert grid.width >= 4 * 8 * 2  # four 8x8 samples, enlarged


def test_translate_without_the_plugin_names_the_distribution_to_install(project):
    result = command("n2n-translate", "--run", "runs/pixels", "--input", "input.png", "--out", "grid2.png",
                     cwd=project, site=None)
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "'pixels'" in line and EXAMPLE_DIST in line and "pip install n2n-example-plugin" in line
    assert not (project / "grid2.png").exists()


API = """
import sys
sys.path.insert(0, {site!r})
import n2n
from PIL import Image

src = n2n.extract("pixels:4", "blocks", data_options={{"count": 32}}, num_workers=0, device="cpu", progress=False)
dst = n2n.extract("pixels:8", "blocks", data_options={{"count": 32}}, num_workers=0, device="cpu", progress=False)
view = n2n.pair(src, dst, name="pixels", root="shards")
run = n2n.train(view, out="runs/api", steps=10, n_flows=2, hidden_dim=16, batch_size=16, eval_every=10,
                device="cpu", progress=False)
image = Image.new("RGB", (32, 32))
image.paste((220, 40, 40), (0, 0, 16, 16))
images = n2n.Translator.load(run).translate([image], n=4)
assert tuple(images.shape) == (1, 4, 3, 8, 8), images.shape
assert dst.meta["expert"]["plugin"] == {dist!r}
print("ok")
"""


def test_the_api_path_with_the_plugin(site, tmp_path):
    missing = [name for name in ("extract", "pair", "train", "Translator") if not hasattr(n2n, name)]
    if missing:
        pytest.skip(f"the Python API lacks n2n.{', n2n.'.join(missing)}")
    result = subprocess.run([sys.executable, "-c", API.format(site=str(site), dist=EXAMPLE_DIST)], cwd=tmp_path,
                            env=env(None), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_the_example_fulfils_the_contracts(site, monkeypatch):
    """In this process: the example's expert decodes what it encodes, and its dataset is deterministic,
    picklable and range-checked, as n2n.Expert and n2n.ItemDataset ask."""
    monkeypatch.syspath_prepend(str(site))
    assert "pixels" in known_experts() and "blocks" in known_datasets()
    assert f"pixels ({EXAMPLE_DIST.split()[0]})" in plugins.listing("expert")
    data = open_dataset("blocks", count=5, size=8)
    again = pickle.loads(pickle.dumps(data))
    assert [again[i]["text"] for i in range(5)] == [data[i]["text"] for i in range(5)]
    assert data.describe()["plugin"] == EXAMPLE_DIST
    expert = load_expert("pixels:8")
    thumbnails = expert.collate([row for i in range(5) for row in expert.rows(data[i])])
    latents = expert.encode(thumbnails)["latent"]
    assert latents.shape == (5, 192) and expert.identity()["plugin"] == EXAMPLE_DIST
    assert torch.allclose(expert.decode(latents).flatten(1), thumbnails["pixels"], atol=1e-5)
    with pytest.raises(DatasetError, match=r"dataset blocks: option count = 0 must be an integer >= 1"):
        open_dataset("blocks", count=0)
    with pytest.raises(ExpertError, match="pixels:99: SIDE must be an integer in 1..32"):
        load_expert("pixels:99")


# ---------------------------------------------------------------- broken plug-ins

BROKEN_DIST = "n2n-broken 0.2"
BROKEN_ENTRY_POINTS = """
[n2n.experts]
importfails = n2n_broken.missing:load
wrongtype = n2n_broken.wrong:load
notcallable = n2n_broken.wrong:NOT_CALLABLE
minilm = n2n_broken.wrong:load

[n2n.datasets]
importfails = n2n_broken.missing:Data
notadataset = n2n_broken.wrong:NotADataset
shapes = n2n_broken.wrong:NotADataset
"""
BROKEN_MODULES = {
    "missing.py": "import n2n_no_such_dependency  # noqa: F401\n",
    "wrong.py": """
        NOT_CALLABLE = 42


        def load(model, layer, weights):
            return "an expert, honestly"


        class NotADataset:
            def __init__(self, root, split):
                pass
        """,
}
# (kind, name, what the one-line message says besides the distribution and the entry point's target)
BROKEN = [
    ("expert", "importfails", "failed to load (ModuleNotFoundError: No module named 'n2n_no_such_dependency')",
     "n2n_broken.missing:load"),
    ("expert", "wrongtype", "returned a str, not an n2n.Expert", "n2n_broken.wrong:load"),
    ("expert", "notcallable", "is not callable (int)", "n2n_broken.wrong:NOT_CALLABLE"),
    ("expert", "minilm", "is claimed twice", "n2n.extract.experts.minilm:load"),
    ("dataset", "importfails", "failed to load (ModuleNotFoundError", "n2n_broken.missing:Data"),
    ("dataset", "notadataset", "is NotADataset, not a subclass of n2n.ItemDataset", "n2n_broken.wrong:NotADataset"),
    ("dataset", "shapes", "is claimed twice", "n2n.extract.datasets.shapes:ShapesDataset"),
]


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """A folder holding the distribution n2n-broken 0.2, as pip would have installed it."""
    site = tmp_path_factory.mktemp("broken-plugin")
    package = site / "n2n_broken"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in BROKEN_MODULES.items():
        (package / name).write_text(textwrap.dedent(text))
    info = site / "n2n_broken-0.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: n2n-broken\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text(BROKEN_ENTRY_POINTS)
    return site


def check_message(message: str, name: str, says: str, target: str) -> None:
    assert "\n" not in message and says in message, message
    assert BROKEN_DIST in message and f"entry point {name} = 'n2n_broken." in message and target in message, message


@pytest.mark.parametrize(("kind", "name", "says", "target"), BROKEN)
def test_a_broken_plugin_is_one_line_naming_distribution_and_entry_point(broken_site, monkeypatch, kind, name, says,
                                                                         target):
    monkeypatch.syspath_prepend(str(broken_site))
    with pytest.raises(ExpertError if kind == "expert" else DatasetError) as err:
        load_expert(name) if kind == "expert" else open_dataset(name)
    check_message(str(err.value), name, says, target)


@pytest.mark.parametrize(("kind", "name", "says", "target"), BROKEN)
def test_n2n_extract_exits_2_on_a_broken_plugin(broken_site, monkeypatch, tmp_path, kind, name, says, target):
    from n2n.extract.cli import main

    monkeypatch.syspath_prepend(str(broken_site))
    expert, data = (name, "biggan") if kind == "expert" else ("bert", name)  # the dataset is opened first
    result = CliRunner().invoke(main, ["--expert", expert, "--data", data, "--out", str(tmp_path / "shards"),
                                       "--device", "cpu"])
    assert result.exit_code == 2, result.output
    check_message(error_line(result.stderr).removeprefix("error: "), name, says, target)
    assert not (tmp_path / "shards").exists()


def test_a_broken_plugin_does_not_stop_the_others(broken_site, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_site))
    assert {"importfails", "wrongtype", "bert", "timm"} <= set(known_experts())
    assert "minilm (conflict)" in plugins.listing("expert")
    assert open_dataset("biggan", count=2).describe()["plugin"] == N2N_DIST  # "shapes" is the one claimed twice


# ---------------------------------------------------------------- in-process registration


class MeanColour(Expert):
    """The mean colour of an image: about the least an expert can be."""

    modality = "image"

    def __init__(self, layer: str | None) -> None:
        super().__init__("mean", "mean-colour", "identity", torch.nn.Linear(3, 3, bias=False), ("rgb",), {"rgb": 3},
                         layer)

    def rows(self, item: dict) -> list[torch.Tensor]:
        return [torch.tensor(item["image"].resize((1, 1)).getpixel((0, 0)), dtype=torch.float32) / 255]

    def collate(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"rgb": torch.stack(rows)}

    def forward(self, batch: dict[str, torch.Tensor], layers) -> dict[str, torch.Tensor]:
        return {"rgb": self.network(batch["rgb"])}

    def preprocess(self) -> dict:
        return {"resize": "1x1"}


class Empty(ItemDataset):
    name = "empty-ish"
    modalities = ("text",)

    def __len__(self) -> int:
        return 1

    def key(self, index: int) -> str:
        return f"item-{self.check_index(index)}"

    def __getitem__(self, index: int) -> dict:
        return {"key": self.key(index), "text": ["nothing much"]}


@pytest.fixture
def registered():
    """Names registered by a test, forgotten after it."""
    names: list[tuple[str, str]] = []
    yield names
    for kind, name in names:
        plugins.unregister(kind, name)


def test_register_expert_and_dataset_in_process(registered):
    n2n.register_expert("meancolour", lambda model, layer, weights: MeanColour(layer))
    n2n.register_dataset("emptyish", Empty)
    registered += [("expert", "meancolour"), ("dataset", "emptyish")]
    expert = load_expert("meancolour@rgb")
    assert isinstance(expert, MeanColour) and expert.identity()["plugin"] == plugins.IN_PROCESS
    assert "meancolour" in known_experts() and "emptyish" in known_datasets()
    data = open_dataset("emptyish")
    assert data[0] == {"key": "item-0", "text": ["nothing much"]} and data.describe()["plugin"] == plugins.IN_PROCESS


def test_in_process_registrations_are_checked_where_used(registered):
    n2n.register_expert("notanexpert", lambda model, layer, weights: None)
    n2n.register_dataset("notadataset", MeanColour)
    registered += [("expert", "notanexpert"), ("dataset", "notadataset")]
    with pytest.raises(ExpertError, match=r"notanexpert.*\(registered in this process\) returned a NoneType"):
        load_expert("notanexpert")
    with pytest.raises(DatasetError, match=r"is MeanColour, not a subclass of n2n.ItemDataset"):
        open_dataset("notadataset")
    with pytest.raises(plugins.PluginError, match=rf"'minilm' is already provided by .* of {N2N_DIST}"):
        n2n.register_expert("minilm", lambda model, layer, weights: MeanColour(layer))


def test_a_missing_family_names_what_to_install_or_register():
    with pytest.raises(ExpertError, match=r"'pixels' of 'pixels:8@latent' is not installed.*mypkg 0\.3.*"
                                          r"pip install mypkg\)$"):
        load_expert("pixels:8@latent", plugin="mypkg 0.3")
    with pytest.raises(ExpertError, match=r"registered in the process that wrote its store; call "
                                          r"n2n.register_expert\('pixels', load\)"):
        load_expert("pixels:8@latent", plugin=plugins.IN_PROCESS)
    with pytest.raises(ExpertError, match="unknown expert 'pixels'; known experts: ae, bert"):
        load_expert("pixels")


SERVE = """
import sys
sys.path.insert(0, {site!r})
from PIL import Image
from n2n.translate.serve import Served, build

served = Served.load("runs/pixels", "cpu")
image = Image.new("RGB", (32, 32))
image.paste((220, 40, 40), (0, 0, 16, 16))
pictures = served.images([image], 3, 1.0, 0)
assert len(pictures) == 3 and pictures[0].size == (8, 8), pictures
build([served])
print("ok")
"""


def test_n2n_serve_builds_the_page_of_a_plugin_run(project, site):
    """n2n serve's tab for a run whose experts a plug-in provides: an image upload, decoded samples."""
    pytest.importorskip("gradio")
    result = subprocess.run([sys.executable, "-c", SERVE.format(site=str(site))], cwd=project, env=env(None),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
