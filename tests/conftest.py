"""Shared fixtures: tiny synthetic data, isolated Luigi configuration and registries per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import luigi
import luigi.configuration
import pytest
import torch
from luigi.configuration import LuigiConfigParser

import pipeline  # noqa: F401 - resolves the presets (pipeline.presets) before any fixture sets luigi's config

REPO = Path(__file__).resolve().parent.parent
TINY_CFG = REPO / "configs" / "tiny.cfg"
# The device the `cuda` tests compare with the CPU. `cpu` runs their code with the CPU standing in for CUDA: it
# proves they still call the library correctly (bench/gpu_check.py's dry run does this), never that CUDA agrees.
CUDA_TEST_DEVICE = os.environ.get("WSSS_CUDA_TEST_DEVICE", "cuda")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A `cuda` test skips (naming why) when CUDA is absent; `-m "not cuda"` deselects them all by default."""
    if item.get_closest_marker("cuda") and CUDA_TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture
def cuda_device():
    """CUDA for the `cuda` tests (or the stand-in named by $WSSS_CUDA_TEST_DEVICE), with TF32 off while the test
    runs: they compare the code on two devices, and cuDNN's default TF32 convolutions alone differ from the CPU by
    ~1e-3 relative (seen on an H200: DeepLab's logits 3.4e-4 apart)."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.device(CUDA_TEST_DEVICE)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from data.synthetic import write_dataset
    return write_dataset(tmp_path_factory.mktemp("syn") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_manifest(tiny_dataset, tmp_path_factory):
    """The tiny dataset's manifest, read as a VOC-layout dataset."""
    from stages.config import DatasetConfig
    from stages.dataset.prepare import prepare_dataset
    cfg = DatasetConfig(kind="voc", root=str(tiny_dataset), label_space=str(tiny_dataset / "labelspace.json"),
                        val_list="ImageSets/Segmentation/val.txt")
    return prepare_dataset(cfg, tmp_path_factory.mktemp("manifest"), log=lambda *_: None)


@pytest.fixture
def one_thread():
    """Torch on one thread for a test module's kernels (2 shared cores: more threads only thrash)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def luigi_config(tmp_path):
    """Load luigi.cfg + configs/tiny.cfg with work_dir in a temporary directory; returns a setter."""
    parser = luigi.configuration.get_config()
    installed = LuigiConfigParser._config_paths

    def reset(paths: list[str]) -> None:
        for section in parser.sections():
            parser.remove_section(section)
        parser.read(paths)
        # what pipeline.presets.loaded_files() reports (the report names the preset the main chain ran)
        LuigiConfigParser._config_paths = paths or installed

    reset([str(REPO / "luigi.cfg"), str(TINY_CFG)])
    parser.set("wsss", "work_dir", str(tmp_path / "work"))
    luigi.task_register.Register.clear_instance_cache()

    def set_option(section: str, option: str, value: object) -> None:
        parser.set(section, option, str(value))
        luigi.task_register.Register.clear_instance_cache()

    yield set_option
    reset([])
    parser.reload()
    luigi.task_register.Register.clear_instance_cache()


def run_luigi(*tasks, workers: int = 1):
    result = luigi.build(list(tasks), local_scheduler=True, detailed_summary=True, workers=workers,
                         log_level="WARNING")
    return result


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, repo: Path = REPO,
            check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``luigi``/``python -m`` commands in a subprocess against the code in ``repo`` (``tiny.cfg`` unless
    ``env_extra`` says otherwise; a None value there removes the variable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo)
    env["LUIGI_CONFIG_PATH"] = str(repo / "configs" / "tiny.cfg")
    env.update(env_extra or {})
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def luigi_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "luigi", "--module", "pipeline", "FullWSSS", "--no-lock", *extra]


def copy_repo(dest: Path) -> Path:
    """A private copy of the code, so a test can edit a stage's source without touching the checkout."""
    for name in ("pipeline", "stages", "models", "data", "configs", "luigi.cfg"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture
def voc_copy(tiny_dataset, tmp_path):
    """A writable VOC-layout copy of the tiny set."""
    root = tmp_path / "voc"
    shutil.copytree(tiny_dataset, root)
    return root


def cfg_for(root, **kw):
    """The DatasetConfig of a VOC-layout copy of the tiny set (``voc_copy``)."""
    from stages.config import DatasetConfig
    return DatasetConfig(kind="voc", root=str(root), label_space=str(root / "labelspace.json"), **kw)
