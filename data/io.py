"""Artifact I/O: atomic writes, images, palette label PNGs and HDF5 dense maps.

Every writer here goes through a temporary sibling that is renamed into place only once complete, so a
killed process never leaves a file that looks finished. Label PNGs are read with PIL only: OpenCV and
imageio silently return palette colours instead of indices.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from data.labelspace import LabelSpace

TMP_MARKER = ".tmp-"


class BadInputError(ValueError):
    """An input file is missing, unreadable or inconsistent. The message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable, so a Luigi worker process can report it
        return (type(self), (self.path, self.problem))


class DiskFullError(OSError):
    """A write ran (or would run) out of disk space. The message names the path and the space involved."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(errno.ENOSPC, f"{self.path}: {message}")

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # picklable, so a Luigi worker process can report it
        return (type(self), (self.path, self.strerror.removeprefix(f"{self.path}: ")))


def free_bytes(path: str | os.PathLike) -> int:
    """Free space on the filesystem holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes in the files under ``path`` (0 when it is gone)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC, or a library's wrapping of it (torch.save and HDF5 report it in the message)."""
    return (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in str(err)


@contextlib.contextmanager
def naming_a_full_disk(out_dir: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing ``out_dir`` into a :class:`DiskFullError` naming the path, what was written
    and what is free (the caller's atomic path then removes the partial output)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if not is_disk_full(err):
            raise
        path = getattr(err, "filename", None) or out_dir
        written = tree_bytes(out_dir)
        raise DiskFullError(path, f"no space left on device while writing {out_dir}: it had written "
                                  f"{mib(written)} and needs more ({mib(free_bytes(out_dir))} free on its "
                                  "filesystem); nothing was published and the partial output is removed. Free "
                                  "space (or move [wsss] work_dir) and rerun") from err


class AlreadyPublishedError(FileExistsError):
    """:func:`atomic_path` (a directory): the destination exists, so this copy was discarded, never merged into it
    nor replacing it. Most often another writer published it first; the caller knows whether that is a result."""


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A unique name next to ``path`` (same filesystem, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARKER}{uuid.uuid4().hex[:10]}")


def is_temporary(path: str | os.PathLike) -> bool:
    return TMP_MARKER in Path(path).name


def temporary_copies(path: str | os.PathLike) -> list[Path]:
    """The temporary siblings of ``path`` that exist: copies a writer is building now, or a killed one left."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        return sorted(path.parent.glob(f"{glob.escape(path.name)}{TMP_MARKER}*"))
    return []


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``path`` on success, delete it on failure.

    An existing ``path`` is replaced (files) or kept (directories: :class:`AlreadyPublishedError`, this copy
    removed; the caller decides what the existing one is).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            _publish_directory(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def _publish_directory(tmp: Path, path: Path) -> None:
    # rename(2) replaces an empty directory and fails on a full one: check first, and read a failure the same way
    # (another writer can publish between the check and the rename).
    discarded = AlreadyPublishedError(f"{path}: already exists; this copy ({tmp.name}) is discarded")
    if path.exists():
        raise discarded
    try:
        os.rename(tmp, path)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise discarded from None
        raise


def remove_path(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_json(path: str | os.PathLike, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default))


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows of dicts (the first row's keys are the header) as CSV, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> object:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(path, "file is missing") from None
    except json.JSONDecodeError as err:
        raise BadInputError(path, f"not valid JSON ({err})") from None


# --------------------------------------------------------------------------------------------------- images

def log_tail(path: str | os.PathLike | None, chars: int = 4000) -> str:
    """The end of a log file for an error message; says so when there is no file, or nothing in it."""
    if path is None:
        return "(no log file)"
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    except OSError as err:
        return f"(could not read the log: {err})"
    return text[-chars:] if text.strip() else "(empty)"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image to an RGB uint8 array (H, W, 3), with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "image file is missing")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadInputError(path, f"cannot decode image ({err})") from None
    return np.asarray(rgb, dtype=np.uint8)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise BadInputError(path, "image file is missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadInputError(path, f"cannot decode image (reading its size: {err})") from None
    return height, width


def read_label_png(path: str | os.PathLike, label_space: LabelSpace | None = None,
                   num_values: int | None = None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label map as class indices (uint8), checking mode, value range and (given ``shape``) size.

    ``num_values`` bounds the valid non-ignore values (defaults to the label space's class count); ``shape``
    is the (H, W) of the image the labels belong to.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "label file is missing")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            labels = np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadInputError(path, f"cannot decode label PNG ({err})") from None
    if mode not in ("P", "L"):
        raise BadInputError(path, f"label PNG must be palette (P) or grey (L) mode, found {mode}: "
                                  "colour label images cannot be decoded into class indices")
    if shape is not None and labels.shape != tuple(shape):
        raise BadInputError(path, f"label map is {labels.shape[0]}x{labels.shape[1]} (HxW) but its image is "
                                  f"{shape[0]}x{shape[1]}")
    if num_values is None and label_space is not None:
        num_values = label_space.num_classes
    if num_values is not None:
        ignore = label_space.ignore_index if label_space is not None else 255
        bad = (labels >= num_values) & (labels != ignore)
        if bad.any():
            values = sorted(int(v) for v in np.unique(labels[bad]))[:10]
            raise BadInputError(path, f"label values {values} are outside the label space "
                                      f"(0..{num_values - 1} and {ignore} = ignore)")
    return labels.astype(np.uint8, copy=False)


def write_label_png(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray) -> None:
    """Write uint8 indices as a palette PNG, atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {labels.shape}")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(np.asarray(palette, dtype=np.uint8)[:256].reshape(-1).tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")  # the temporary name has no extension: name the format


def write_jpeg(path: str | os.PathLike, rgb: np.ndarray, quality: int = 92) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=quality)
