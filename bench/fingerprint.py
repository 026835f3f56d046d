"""Dataset fingerprint (PrepareDataset's key): seconds to fingerprint a 10,000-image VOC-layout tree.

Against a baseline in the same run: a bare loop of ``os.stat`` over the files that exist (the floor of any stat
fingerprint). Target: the warm stat fingerprint (page and dentry caches filled) within 1 s for 10,000 images.
Alone: ``python -m bench.fingerprint``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import timed  # noqa: E402
from stages.config import DatasetConfig  # noqa: E402
from stages.dataset.prepare import input_fingerprint  # noqa: E402


def write_tree(root: Path, n_images: int, n_val: int) -> list[Path]:
    """Small stand-in files (the fingerprint never decodes): image, XML and mask for every id."""
    ids = [f"2012_{i:06d}" for i in range(n_images)]
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(ids[n_val:]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[:n_val]) + "\n")
    files = []
    for folder, ext, size in (("JPEGImages", ".jpg", 2048), ("Annotations", ".xml", 512),
                              ("SegmentationClass", ".png", 1024)):
        (root / folder).mkdir()
        payload = b"x" * size
        for image_id in ids:
            path = root / folder / f"{image_id}{ext}"
            path.write_bytes(payload)
            files.append(path)
    return files


def bench_fingerprint(n_images: int = 10_000, n_val: int = 1_500) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc"
        files = [str(p) for p in write_tree(root, n_images, n_val)]
        cfg = DatasetConfig(kind="voc", root=str(root))
        content = DatasetConfig(kind="voc", root=str(root), fingerprint_mode="content")
        start = time.perf_counter()
        input_fingerprint(cfg)
        first = time.perf_counter() - start
        warm = timed(lambda: input_fingerprint(cfg), 3)
        bare = timed(lambda: [os.stat(p) for p in files], 3)
        hashed = timed(lambda: input_fingerprint(content), 1)
    return {"images": n_images, "files_on_disk": len(files), "stat_candidates_per_image": 6,
            "first_s": first, "warm_s": warm, "bare_stat_loop_s": bare, "ratio_warm_vs_bare_stat": warm / bare,
            "content_mode_s": hashed, "target_warm_s": 1.0, "within_target": warm <= 1.0}


if __name__ == "__main__":
    for key, value in bench_fingerprint().items():
        print(f"  {key:<30} {value:.4g}" if isinstance(value, float) else f"  {key:<30} {value}")
