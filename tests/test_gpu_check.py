"""make gpu-check's script (bench.gpu_check): its dry run end to end on the CPU, so that it is known to
work before a GPU machine is borrowed for it; its fail-soft parts; its bad input; the wheel check."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def gpu_check_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_dry_run_records_every_part_and_survives_a_failed_one(tmp_path):
    # bench_extraction is made to fail (timed out before it starts): the parts after it must still run
    done = gpu_check_run("--dry", "--out", str(tmp_path), "--timeout", "bench_extraction=0.1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry"] and report["finished"]
    parts = {record["name"]: record for record in report["parts"]}
    assert list(parts) == list(gpu_check.PARTS)
    failed = parts.pop("bench_extraction")
    assert failed["result"] == "failed" and "timed out" in failed["error"]
    for name, record in parts.items():
        assert record["result"] == ("passed" if gpu_check.PARTS[name].kind == "correctness" else "measured"), record
    assert (tmp_path / "bench" / "bench_compile" / "compile-cpu.json").exists()
    for name, dtype in (("cinn_step_fp32", "float32"), ("cinn_step_bf16", "bfloat16")):  # each its own precision
        written = json.loads(next((tmp_path / "bench" / name).glob("cinn_step*.json")).read_text())
        assert written["settings"]["dtype"] == dtype and written["settings"]["device"] == "cpu"
    assert (tmp_path / "logs" / "demo.log").exists()
    assert "bench_extraction" in done.stdout and "timed out" in done.stdout  # the table


def test_bad_input_is_one_line_naming_it(tmp_path):
    done = gpu_check_run("--dry", "--only", "demo,bogus", "--out", str(tmp_path))
    assert done.returncode != 0 and "'bogus'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    (tmp_path / "file").write_text("")
    done = gpu_check_run("--dry", "--only", "demo", "--out", str(tmp_path / "file" / "out"))
    assert done.returncode != 0 and "file/out" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = gpu_check_run("--dry", "--timeout", "demo=soon", "--out", str(tmp_path))
    assert done.returncode != 0 and "demo=soon" in done.stderr


def fake_wheel(folder: Path, name: str, size: int = 0, requires: tuple[str, ...] = ()) -> None:
    """A wheel with just its METADATA (and ``size`` bytes of padding, stored uncompressed)."""
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                  for r in requires)
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{name}-1.0.dist-info/METADATA", metadata)
        wheel.writestr(f"{name}/padding", b"\0" * size)


def test_wheel_check_wants_every_requirement_within_the_budget(tmp_path, capsys):
    for name in ("zarr", "zarrs", "webdataset", "universal-pathlib"):
        fake_wheel(tmp_path, name, requires=("numpy>=2", "typing_extensions; python_version < '3.13'",
                                             "s3fs; extra == 's3'"))
    fake_wheel(tmp_path, "pytorch-pretrained-biggan", requires=("boto3", "torch (>=0.4.1)"))
    assert gpu_check.check_wheels(tmp_path) == 2
    assert "boto3 (for pytorch-pretrained-biggan)" in capsys.readouterr().err
    fake_wheel(tmp_path, "boto3", size=2**20)
    assert gpu_check.check_wheels(tmp_path) == 0
    assert gpu_check.check_wheels(tmp_path, budget_mib=0.5) == 2
    assert "over the 0.5 MiB budget" in capsys.readouterr().err
