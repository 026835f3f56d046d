"""bench/gpu_check.py (``make gpu-check``): its dry run, tiny sizes on the CPU, proves the script still works."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import PARTS, requirements

REPO = Path(__file__).resolve().parent.parent


def gpu_check(tmp_path: Path, *args: str, python: str = sys.executable) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--python", python,
                           "--out", str(out), "--work", str(tmp_path / "work"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    return proc, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_reports_every_part_and_claims_no_cuda_result(tmp_path):
    proc, report = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report["dry_run"] is True
    assert [row["part"] for row in report["parts"]] == list(PARTS)
    for row in report["parts"]:
        assert row["status"] == "ok", row
        assert row["verdict"] == "n/a" and row["device"].startswith("cpu"), row
        # No figure that names CUDA holds a value (env's cuda_available is False, its CUDA build None).
        assert not [k for k, v in row["figures"].items() if "cuda" in k.lower() and v], row["figures"]
    rows = {row["part"]: row for row in report["parts"]}
    assert rows["pytest_cuda"]["figures"]["passed"] > 0 and "standing in" in rows["pytest_cuda"]["summary"]
    assert rows["pytest_cuda"]["figures"]["failures"] == rows["pytest_cuda"]["figures"]["errors"] == 0
    assert rows["shards"]["figures"]["MakeCAM_images"] > 0 and rows["shards"]["figures"]["Propagate_images_per_s"] > 0
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table.startswith("# gpu-check (dry run")
    for part in PARTS:
        assert sum(line.startswith(f"| {part} | ok | cpu") for line in table.splitlines()) == 1, table
    assert (tmp_path / "out" / "pytest-cuda.xml").exists()
    assert "===== crf" in (tmp_path / "out" / "logs.txt").read_text()


def test_a_failing_part_does_not_stop_the_others(tmp_path):
    # An interpreter that fails the crf part and runs everything else.
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *"gpu_parts crf"*) echo "crf broke" >&2; exit 3;; esac\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc, report = gpu_check(tmp_path, "--parts", "crf,deeplab", python=str(fake))
    assert proc.returncode == 1
    assert [(row["part"], row["status"]) for row in report["parts"]] == [("crf", "failed"), ("deeplab", "ok")]
    assert "crf broke" in report["parts"][0]["error"]
    assert "## crf: failed" in (tmp_path / "out" / "gpu_check.md").read_text()
    # A spent budget leaves parts "not run", never "ok".
    proc, report = gpu_check(tmp_path, "--parts", "crf,walk", "--budget-s", "0")
    assert proc.returncode == 1 and [row["status"] for row in report["parts"]] == ["not run", "not run"]


def test_requirements_come_from_setup_cfg():
    specs = requirements()
    assert "luigi>=3.5" in specs and "pydensecrf2>=1.1" in specs and "pytest>=7" in specs
    assert not [s for s in specs if s.startswith("ruff")]


def test_a_venv_made_from_a_venv_keeps_its_packages_and_a_failed_install_stops_only_itself(tmp_path, monkeypatch):
    # The GPU image's python3 is itself a venv holding a CUDA torch; `venv --system-site-packages` alone would hide
    # that torch. Here the test's interpreter (this project's .venv) plays that image, and one requirement cannot
    # be installed: the environment part fails, naming it, and the walk part still runs in the new environment.
    import bench.gpu_check as check

    assert sys.prefix != sys.base_prefix, "the test needs to run from a virtual environment"
    monkeypatch.setattr(check, "requirements", lambda: [*requirements(), "wsss-no-such-package>=1"])
    (tmp_path / "wheels").mkdir()
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry-run", "--parts", "env,walk", "--venv",
                                      str(tmp_path / "venv"), "--wheels", str(tmp_path / "wheels"), "--out", str(out)])
    assert check.main() == 1
    report = json.loads((out / "gpu_check.json").read_text())
    env, walk = report["parts"]
    assert env["status"] == "failed" and "wsss-no-such-package" in env["error"]
    assert walk["status"] == "ok", walk.get("error")
    assert report["python"] == str(tmp_path / "venv" / "bin" / "python")
