"""The Slurm template writes its job-local preset into a fresh private folder, never a predictable /tmp name, and
removes it at the end (issue 15). The full run of the template is tests/test_cluster.py (slow)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_job_preset_lives_in_a_private_random_folder(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    seen = tmp_path / "seen.txt"
    # A stand-in venv: `luigi` records where its preset is and how that folder is protected; `python` is the real one
    # except for the final `python -m pipeline status`.
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    (venv / "bin" / "luigi").write_text(
        f'#!/bin/sh\necho "$LUIGI_CONFIG_PATH $(stat -c %a "$(dirname "$LUIGI_CONFIG_PATH")")" > "{seen}"\n'
        'grep -q "^gpu = 2" "$LUIGI_CONFIG_PATH"\n')
    (venv / "bin" / "python").write_text(
        f'#!/bin/sh\n[ "$1 $2" = "-m pipeline" ] && exit 0\nexec "{sys.executable}" "$@"\n')
    for name in ("luigi", "python"):
        (venv / "bin" / name).chmod(0o755)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, WSSS_REPO=str(REPO), WSSS_VENV=str(venv), WSSS_CONFIG=str(REPO / "configs" / "tiny.cfg"),
               WSSS_GPUS="2", WSSS_RUN_DIR=str(tmp_path), TMPDIR=str(tmpdir))
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(["bash", str(REPO / "configs" / "slurm_allocation.sbatch")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    preset, mode = seen.read_text().split()
    folder = Path(preset).parent
    assert folder.parent == tmpdir and folder.name.startswith("wsss-local-") and len(folder.name.split(".")[-1]) == 8
    assert stat.S_IMODE(int(mode, 8)) == 0o700
    assert list(tmpdir.iterdir()) == []          # removed at the end
