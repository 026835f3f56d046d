"""Dense float maps (CAMs, probabilities) in HDF5.

Layout: one file per shard, one group per image under ``/images/<id>``, each array a float16 dataset
chunked one class plane per chunk (the unit every reader touches), gzip-1 + byte shuffle (the best
size/speed point measured for smooth maps; see bench/bench_storage.py). Small per-image metadata
(class keys, original size) are group attributes. One writer per file; readers open read-only after the
file has been renamed into place, so no HDF5 locking games are needed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from data.artifacts import SHARD_INDEX
from data.io import BadInputError, DiskFullError, atomic_path, free_bytes, mib, read_json

COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
# Kept free beyond an image's uncompressed bytes: HDF5 metadata, and the close that writes it.
DISK_MARGIN = 8 * 2**20


class DenseMapWriter:
    """Write per-image dense maps into one HDF5 file, published atomically on ``close``."""

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, object] | None = None,
                 dtype: str = "float16"):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._file = h5py.File(self._tmp, "w-", libver="latest", track_order=True)
        self._file.attrs["complete"] = 0
        for key, value in (attrs or {}).items():
            self._file.attrs[key] = value
        self._images = self._file.create_group("images")
        self.count = 0

    def write(self, image_id: str, arrays: Mapping[str, np.ndarray],
              attrs: Mapping[str, object] | None = None) -> None:
        self._check_space(image_id, arrays)
        group = self._images.create_group(image_id)
        for name, array in arrays.items():
            array = np.asarray(array)
            chunks = None
            if array.ndim == 3 and array.size:
                chunks = (1, *array.shape[1:])
            elif array.ndim == 2 and array.size:
                chunks = array.shape
            kwargs = COMPRESSION if chunks else {}
            group.create_dataset(name, data=array.astype(self.dtype if array.dtype.kind == "f" else array.dtype),
                                 chunks=chunks, **kwargs)
        for key, value in (attrs or {}).items():
            group.attrs[key] = value
        self.count += 1

    def _check_space(self, image_id: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Refuse a write the disk cannot hold before HDF5 tries it: libhdf5 hits ENOSPC while evicting chunks from
        its cache, where h5py can only ignore the error, and the process then crashes (SIGSEGV)."""
        needed = sum(np.asarray(a).size * (self.dtype.itemsize if np.asarray(a).dtype.kind == "f"
                                           else np.asarray(a).dtype.itemsize) for a in arrays.values())
        free = free_bytes(self._tmp)
        if needed + DISK_MARGIN > free:
            raise DiskFullError(self.path, f"not enough disk space to write image {image_id!r}: it needs up to "
                                           f"{mib(needed)} (+ {mib(DISK_MARGIN)} kept free) and {mib(free)} are "
                                           "free on its filesystem; nothing was published and the partial file is "
                                           "removed. Free space (or move [wsss] work_dir) and rerun")

    def close(self) -> None:
        self._file.attrs["complete"] = 1
        self._file.attrs["n_images"] = self.count
        self._file.close()
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard the file. Never raises: closing may fail again (a full disk), and the file is deleted anyway."""
        with contextlib.suppress(Exception):
            self._file.close()
        exc = exc if exc is not None else RuntimeError("dense-map writer aborted")
        with contextlib.suppress(BaseException):
            self._ctx.__exit__(type(exc), exc, None)

    def __enter__(self) -> DenseMapWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)


class DenseMapReader:
    """Read per-image maps from one or more shard files written by :class:`DenseMapWriter`.

    Files are opened lazily and per process, never across ``fork``.
    """

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        self._files: dict[Path, h5py.File] = {}
        self._index: dict[str, Path] | None = None
        self._pid = os.getpid()

    def _file(self, path: Path) -> h5py.File:
        if self._pid != os.getpid():  # forked: handles of the parent are not ours to use
            self._files, self._pid = {}, os.getpid()
        if path not in self._files:
            try:
                handle = h5py.File(path, "r")
            except FileNotFoundError:
                raise BadInputError(path, "dense-map shard is missing") from None
            except OSError as err:
                raise BadInputError(path, f"cannot open HDF5 file ({err})") from None
            if not handle.attrs.get("complete", 0):
                handle.close()
                raise BadInputError(path, "HDF5 shard was not completely written")
            self._files[path] = handle
        return self._files[path]

    @property
    def index(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for path in self.paths:
                for image_id in _walk_ids(self._file(path)["images"]):
                    self._index[image_id] = path
        return self._index

    def ids(self) -> list[str]:
        return list(self.index)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def read(self, image_id: str, names: Iterable[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """Return ``(arrays, attrs)`` for one image; arrays come back as float32."""
        path = self.index.get(image_id)
        if path is None:
            raise BadInputError(self.paths[0].parent if self.paths else "<no shards>",
                                f"no dense map stored for image {image_id!r}")
        group = self._file(path)["images"][image_id]
        names = list(group.keys()) if names is None else list(names)
        arrays = {}
        for name in names:
            if name not in group:
                raise BadInputError(path, f"image {image_id!r} has no array {name!r}")
            data = group[name][()]
            arrays[name] = data.astype(np.float32) if data.dtype.kind == "f" else data
        return arrays, dict(group.attrs)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files = {}

    def __enter__(self) -> DenseMapReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _walk_ids(group: h5py.Group, prefix: str = "") -> Iterator[str]:
    # Ids may contain "/" (sub-folders of a custom dataset); h5py turns those into nested groups.
    for name, item in group.items():
        if isinstance(item, h5py.Group) and not any(isinstance(v, h5py.Dataset) for v in item.values()):
            yield from _walk_ids(item, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}"


def stage_maps(stage_dir: str | os.PathLike) -> DenseMapReader:
    """Reader over the dense maps of a published sharded stage (its ``index.json`` lists the shard files)."""
    stage_dir = Path(stage_dir)
    index = read_json(stage_dir / SHARD_INDEX)
    return DenseMapReader(stage_dir / name for name in index["shards"])


def read_cam(cams: DenseMapReader, image_id: str, name: str, size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """One image's CAM planes and their class keys, checked against the image size."""
    arrays, attrs = cams.read(image_id, [name])
    cam, keys = arrays[name], [int(k) for k in attrs["keys"]]
    if name == "high_res" and cam.shape[1:] != tuple(size):
        raise BadInputError(cams.index[image_id], f"CAM of image {image_id!r} is {cam.shape[1:]}, image is {size}")
    if cam.shape[0] != len(keys):
        raise BadInputError(cams.index[image_id], f"image {image_id!r}: {cam.shape[0]} CAM planes, {len(keys)} keys")
    return cam, keys
