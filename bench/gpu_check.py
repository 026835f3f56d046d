"""``make gpu-check``: every CUDA path tested and benchmarked by one command, on a GPU machine lent for minutes.

Parts, in order, each in a process of its own with a timeout (a failure or a timeout of one never stops the
others), within one time budget (``--budget-s``, default 480 s):

1. ``env``: the interpreter. ``--python PY`` uses PY as it is; otherwise the virtual environment ``--venv`` is
   reused, or created with ``--system-site-packages`` (a GPU image's own CUDA build of torch is kept), and
   what it lacks is installed: ``--torch-spec`` only when it has no torch or a torch without CUDA, then the
   requirements of setup.cfg (``[options] install_requires`` and the ``test`` extra) that are missing, from
   the package index or, with ``--wheels DIR``, from that folder alone (an offline machine). The code itself
   is imported from this checkout (``PYTHONPATH``), never installed.
2. ``pytest_cuda``: ``pytest -m cuda`` on the test files that hold CUDA tests (CPU against CUDA).
3. ``crf``, ``walk``, ``deeplab``, ``shards``, ``allocator``: bench/gpu_parts.py at VOC's size; ``gmnet``: GMNet's
   Pascal-Part-58 recipe at 513^2 on random weights (it comes last and needs about 5 minutes of its own:
   ``--parts env,gmnet``).

It prints progress, and writes ``gpu_check.json`` (everything), ``gpu_check.md`` (the table), ``logs.txt``
(every part's output) and ``pytest-cuda.xml`` into ``--out``; scratch files go to ``--work``. Exit status 0
when every part succeeded, 1 when one failed or timed out, 2 when a real run found no CUDA device.

``--dry-run`` runs the same parts on tiny sizes with every CUDA device hidden, and the CUDA tests with the CPU
standing in for CUDA (``WSSS_CUDA_TEST_DEVICE=cpu``): CI runs it (tests/test_gpu_check.py) to prove the
script still works; it never reports a CUDA result. This file uses the standard library only: it starts
before any environment exists.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("env", "pytest_cuda", "crf", "walk", "deeplab", "shards", "allocator", "gmnet")
# Per-part caps in seconds (real run, dry run); the budget's remainder caps them further.
TIMEOUTS = {"env": (240, 240), "pytest_cuda": (150, 90), "crf": (90, 60), "walk": (90, 60), "deeplab": (120, 60),
            "shards": (240, 120), "allocator": (120, 60), "gmnet": (300, 90)}
# Imported by name to decide whether the environment is complete (distribution -> module).
MODULES = {"torch": "torch", "numpy": "numpy", "scipy": "scipy", "pillow": "PIL", "h5py": "h5py",
           "opencv-python-headless": "cv2", "luigi": "luigi", "pydensecrf2": "pydensecrf", "PyMaxflow": "maxflow",
           "tqdm": "tqdm", "matplotlib": "matplotlib", "psutil": "psutil", "submitit": "submitit",
           "pytest": "pytest", "ruff": None}


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def requirements(setup_cfg: Path = REPO / "setup.cfg") -> list[str]:
    """setup.cfg's install_requires and its ``test`` extra, less ruff (linting is not part of the check)."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    specs = [*parser["options"]["install_requires"].split("\n"), *parser["options.extras_require"]["test"].split("\n")]
    return [s.strip() for s in specs if s.strip() and not s.strip().startswith(("#", "ruff"))]


def distribution_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]


def run_logged(cmd: list[str], logs: list[str], title: str, timeout: float, env: dict | None = None,
               cwd: Path = REPO) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; kill the whole group at the timeout. (exit code or None, output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(timeout, 1))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    logs.append(f"===== {title}: {' '.join(cmd)} -> {'timeout' if code is None else code}\n{output}")
    return code, output


def probe(python: str, logs: list[str]) -> dict:
    """Which of the modules the interpreter imports, and whether its torch is a CUDA build."""
    script = ("import importlib, json\nfound = {}\nfor m in %r:\n    try:\n        importlib.import_module(m)\n"
              "        found[m] = True\n    except Exception:\n        found[m] = False\ncuda = None\n"
              "if found.get('torch'):\n    import torch\n    cuda = torch.version.cuda\n"
              "print(json.dumps({'modules': found, 'torch_cuda_build': cuda}))") % [m for m in MODULES.values() if m]
    code, output = run_logged([python, "-c", script], logs, "probe", 120)
    if code != 0:
        return {"modules": {}, "torch_cuda_build": None}
    return json.loads(output.strip().splitlines()[-1])


def prepare_python(args: argparse.Namespace, logs: list[str], timeout: float) -> tuple[str, list[str]]:
    """The interpreter the parts run with, and what was installed (raises when the environment is unusable)."""
    if args.python:
        return args.python, []
    deadline = time.monotonic() + timeout
    venv = Path(args.venv).resolve()
    python = str(venv / "bin" / "python")
    if not Path(python).exists():
        log(f"creating {venv} (system site-packages visible: a preinstalled CUDA torch is reused)")
        code, out = run_logged([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], logs, "venv", 120)
        if code != 0:
            raise RuntimeError(f"python -m venv {venv} failed:\n{out[-2000:]}")
        see_parent_packages(python, logs)
    found = probe(python, logs)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    if args.wheels:
        pip += ["--no-index", "--find-links", str(Path(args.wheels).resolve())]
    installed = []
    wants_cuda = not args.dry_run
    if not found["modules"].get("torch") or (wants_cuda and not found["torch_cuda_build"]):
        if not args.torch_spec:
            raise RuntimeError("the environment's torch is missing or has no CUDA build, and --torch-spec is empty")
        log(f"installing {args.torch_spec} (torch there: {found['modules'].get('torch')}, "
            f"CUDA build: {found['torch_cuda_build']})")
        code, out = run_logged([*pip, args.torch_spec], logs, "pip torch", deadline - time.monotonic())
        if code != 0:
            how = "timed out" if code is None else f"exited {code}"
            raise RuntimeError(f"pip install {args.torch_spec} {how}:\n{out[-2000:]}")
        installed.append(args.torch_spec)
    missing = [s for s in requirements() if distribution_name(s) != "torch"
               and not found["modules"].get(MODULES.get(distribution_name(s), distribution_name(s)))]
    failures = []
    for spec in missing:  # one at a time: a package that fails to build keeps none of the others out
        log(f"installing {spec}")
        code, out = run_logged([*pip, spec], logs, f"pip {spec}", deadline - time.monotonic())
        if code == 0:
            installed.append(spec)
        else:
            failures.append(f"pip install {spec} {'timed out' if code is None else f'exited {code}'}:\n{out[-1500:]}")
    if failures:
        raise RuntimeError("\n".join(failures))
    return python, installed


def see_parent_packages(python: str, logs: list[str]) -> None:
    """Make a new environment see the packages of the environment this script runs in, when that is a venv.

    ``venv --system-site-packages`` exposes the *base* interpreter's packages, so on an image whose ``python3``
    is itself a venv (a CUDA torch installed there) the new environment would not see that torch. A ``.pth``
    file listing the parent's site-packages, appended after the new environment's own, restores it."""
    if sys.prefix == sys.base_prefix:
        return
    import site
    code, out = run_logged([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], logs,
                           "site-packages", 60)
    if code == 0:
        parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
        (Path(out.strip().splitlines()[-1]) / "_parent_env.pth").write_text("\n".join(parents) + "\n")


def child_env(dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", WSSS_CUDA_TEST_DEVICE="cpu", OMP_NUM_THREADS="1")
    return env


def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def run_pytest(python: str, args: argparse.Namespace, logs: list[str], timeout: float) -> dict:
    xml = Path(args.out) / "pytest-cuda.xml"
    cmd = [python, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *cuda_test_files()]
    code, output = run_logged(cmd, logs, "pytest -m cuda", timeout, env=child_env(args.dry_run))
    if code is None:
        return {"status": "timeout", "error": output[-3000:]}
    if not xml.exists():
        return {"status": "failed", "error": output[-3000:]}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, failed_names = [], []
    for suite in ElementTree.parse(xml).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for bad in (*case.findall("failure"), *case.findall("error")):
                failed_names.append(case.get("name"))
                failed.append(f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    figures = {**counts, "passed": passed, "failed_tests": failed, "files": cuda_test_files()}
    where = "CPU standing in for CUDA" if args.dry_run else "CPU vs CUDA"
    summary = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped ({where})"
    if failed:
        summary += "; failed: " + ", ".join(failed_names)
    if counts["failures"] or counts["errors"] or code not in (0, 5):
        status = "failed"
    elif passed == 0:
        status = "skipped"
    else:
        status = "ok"
    return {"status": status, "figures": figures, "summary": summary, "target": "every CUDA test passes",
            "verdict": "n/a" if args.dry_run else ("met" if status == "ok" else "not met"),
            "device": "cpu (stand-in)" if args.dry_run else None, "error": output[-3000:] if status != "ok" else ""}


def run_part(python: str, part: str, args: argparse.Namespace, logs: list[str], timeout: float) -> dict:
    result_file = Path(args.work) / "parts" / f"{part}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    cmd = [python, "-m", "bench.gpu_parts", part, "--out", str(result_file), "--work", str(args.work)]
    if args.dry_run:
        cmd.append("--dry-run")
    code, output = run_logged(cmd, logs, part, timeout, env=child_env(args.dry_run))
    if code is None:
        return {"status": "timeout", "error": output[-3000:]}
    if code != 0 or not result_file.exists():
        return {"status": "failed", "error": output[-3000:]}
    return {"status": "ok", **json.loads(result_file.read_text())}


def markdown(report: dict) -> str:
    mode = "dry run: tiny sizes on the CPU, no CUDA result" if report["dry_run"] else "GPU run, VOC sizes"
    lines = [f"# gpu-check ({mode})", "", f"{report['started']}, {report['total_s']:.0f} s in all; "
             f"python {report['python']}", "",
             "| part | status | device | result | target | verdict | s |", "|---|---|---|---|---|---|---|"]
    for row in report["parts"]:
        cells = [row["part"], row["status"], row.get("device") or "", row.get("summary") or "", row.get("target") or "",
                 row.get("verdict") or "", f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    failures = [row for row in report["parts"] if row["status"] not in ("ok", "skipped")]
    for row in failures:
        lines += ["", f"## {row['part']}: {row['status']}", "", "```", (row.get("error") or "")[-2000:], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu"), help="results folder")
    parser.add_argument("--work", help="scratch folder (default: <out>/work)")
    parser.add_argument("--python", help="run the parts with this interpreter as it is (no environment step)")
    parser.add_argument("--venv", default=str(REPO / ".venv-gpu"), help="environment to reuse or create")
    parser.add_argument("--torch-spec", default="torch",
                        help="pip spec installed when the environment has no CUDA build of torch")
    parser.add_argument("--wheels", help="install only from this folder of wheels (offline machines)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time for everything, installation included")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU only: checks the plumbing")
    args = parser.parse_args()
    chosen = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts: {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out, args.work = str(out), str(Path(args.work).resolve() if args.work else out / "work")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    start, logs, rows = time.monotonic(), [], []
    report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "python": None,
              "installed": [], "parts": rows}
    python = args.python or sys.executable

    for part in PARTS:
        if part not in chosen:
            continue
        left = args.budget_s - (time.monotonic() - start)
        row = {"part": part}
        if left < 5:
            row.update(status="not run", error="the time budget was spent", seconds=0.0)
            rows.append(row)
            continue
        timeout = min(TIMEOUTS[part][1 if args.dry_run else 0], left)
        log(f"{part}: starting (timeout {timeout:.0f} s)")
        began = time.monotonic()
        try:
            if part == "env":
                python, report["installed"] = prepare_python(args, logs, timeout)
                row.update(run_part(python, part, args, logs, max(timeout - (time.monotonic() - began), 30)))
            elif part == "pytest_cuda":
                row.update(run_pytest(python, args, logs, timeout))
            else:
                row.update(run_part(python, part, args, logs, timeout))
        except Exception as error:  # a part's failure is recorded, the others still run
            row.update(status="failed", error=f"{type(error).__name__}: {error}")
            venv_python = Path(args.venv).resolve() / "bin" / "python"
            if part == "env" and not args.python and venv_python.exists():
                python = str(venv_python)  # what did install is there; the parts that need the rest fail alone
        row["seconds"] = time.monotonic() - began
        rows.append(row)
        log(f"{part}: {row['status']} in {row['seconds']:.0f} s" + (f": {row['summary']}" if row.get("summary") else
                                                                      f"\n{(row.get('error') or '')[-800:]}"))
    report["python"], report["total_s"] = python, time.monotonic() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    (out / "logs.txt").write_text("\n".join(logs))
    log(f"done in {report['total_s']:.0f} s: {out / 'gpu_check.md'}")
    print(markdown(report))
    if any(row["status"] not in ("ok", "skipped") for row in rows):
        return 1
    env_row = next((row for row in rows if row["part"] == "env" and row["status"] == "ok"), None)
    if not args.dry_run and env_row and not env_row["figures"]["cuda_available"]:
        log("no CUDA device: nothing above is a GPU result")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
