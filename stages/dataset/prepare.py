"""Dataset preparation: materialise the embedded dataset or check a VOC-layout one, and write a manifest.

The manifest is what every later stage reads: root, label space, the id lists and the image-level labels,
plus the images quarantined as bad input (when the user asks for quarantine instead of an error).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from data import synthetic
from data.io import BadInputError
from data.labelspace import VOC_LABEL_SPACE, LabelSpace
from data.manifest import MANIFEST, Manifest
from data.voc import VOCLayout, read_id_list
from stages.config import DatasetConfig, validate

# Per image, the files a VOC-layout dataset may hold for it; the masks' folders come from the config.
ANNOTATION_FILES = (("JPEGImages", ".jpg"), ("Annotations", ".xml"), ("Points", ".json"), ("Scribbles", ".png"))


def image_files(cfg: DatasetConfig, image_id: str) -> list[str]:
    """The files (relative to the root) any stage may read for ``image_id``: image, XML, both masks' folders,
    point and scribble annotations, whether or not they exist."""
    folders = [*ANNOTATION_FILES, (cfg.seg_dir, ".png"), (cfg.eval_seg_dir, ".png")]
    return list(dict.fromkeys(f"{folder}/{image_id}{ext}" for folder, ext in folders))


def listed_ids(cfg: DatasetConfig, root: Path) -> list[str]:
    return list(dict.fromkeys(i for key in ("train_list", "eval_list", "val_list")
                              for i in read_id_list(root / getattr(cfg, key))))


def files_digest(root: Path, rel_paths: list[str], mode: str) -> str:
    """One digest of ``rel_paths`` under ``root``: path, size, mtime (ns) and inode of each (``stat``: one stat
    call per file, no reading) or path and bytes (``content``, for filesystems whose mtimes cannot be trusted).
    A missing file counts as missing, so adding one changes the digest too."""
    digest = hashlib.sha256()
    base = str(root) + os.sep
    for rel in rel_paths:
        try:
            if mode == "content":
                with open(base + rel, "rb") as fh:
                    fact = hashlib.file_digest(fh, "sha256").hexdigest()
            else:
                st = os.stat(base + rel)
                fact = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        except (FileNotFoundError, NotADirectoryError):
            fact = "-"
        digest.update(f"{rel}\0{fact}\n".encode())
    return digest.hexdigest()[:16]


def input_fingerprint(cfg: DatasetConfig) -> dict[str, str]:
    """What identifies an external dataset beyond the config: the content of its id lists and label space, and a
    digest of every file the manifest is built from (``[PrepareDataset] fingerprint_mode``: stat or content).

    Called while scheduling, so an edited image, mask or XML reruns PrepareDataset; an unreadable list is left for
    PrepareDataset itself to report, naming the file.
    """
    if cfg.kind != "voc":
        return {}
    root = Path(cfg.root).expanduser().resolve()
    facts = {}
    for key in ("train_list", "eval_list", "val_list", "label_space"):
        rel = getattr(cfg, key)
        if rel:
            path = root / rel if key != "label_space" else Path(rel)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
            facts[key] = digest
    try:
        ids = listed_ids(cfg, root)
    except BadInputError as err:
        facts["files"] = f"unreadable: {err.problem}"
        return facts
    facts["files"] = files_digest(root, [rel for i in ids for rel in image_files(cfg, i)], cfg.fingerprint_mode)
    return facts


def warn_overlap(splits: dict[str, list[str]], lists: dict[str, str], log) -> None:
    """Ids in both the training and the val list: val scores on them are not held-out scores (allowed, warned)."""
    val = set(splits["val"])
    both = [i for i in splits["train"] if i in val]
    if both:
        log(f"warning: {len(both)} image id(s) are in both {lists['train']} and {lists['val']} "
            f"(e.g. {', '.join(both[:3])}): val scores on them are not held out")


def prepare_dataset(cfg: DatasetConfig, out_dir: str | os.PathLike, processes: int = 1,
                    log=print) -> Manifest:
    """Write the dataset manifest (and, for ``synthetic``, the images themselves) into ``out_dir``."""
    validate(cfg)
    out_dir = Path(out_dir)
    if cfg.kind == "synthetic":
        synthetic.write_dataset(out_dir / "VOC", cfg.profile, cfg.seed, processes=processes)
        root, rel_root = out_dir / "VOC", Path("VOC")
        space = synthetic.label_space()
    else:
        if not cfg.root:
            raise ValueError("Dataset.root must name the dataset directory when Dataset.kind = voc")
        root = rel_root = Path(cfg.root).expanduser().resolve()
        if not (root / "JPEGImages").is_dir():
            raise BadInputError(root, "not a VOC-layout dataset root (no JPEGImages/ folder)")
        space = LabelSpace.load(cfg.label_space) if cfg.label_space else VOC_LABEL_SPACE

    layout = VOCLayout(root, space, cfg.seg_dir, cfg.eval_seg_dir)
    lists = {"train": cfg.train_list, "eval": cfg.eval_list, "val": cfg.val_list}
    splits: dict[str, list[str]] = {}
    for split, rel in lists.items():
        splits[split] = read_id_list(root / rel)
    warn_overlap(splits, lists, log)

    image_labels: dict[str, list[int]] = {}
    quarantine: list[dict] = []
    contents: dict[str, str] = {}   # id -> digest of its files' bytes: what downstream keys see of the data
    bad: set[str] = set()
    with_mask = {i for s in ("eval", "val") for i in splits[s]}
    train = set(splits["train"])
    for image_id in dict.fromkeys(i for ids in splits.values() for i in ids):
        try:
            vec = layout.check(image_id, cfg.image_labels_from, with_mask=image_id in with_mask,
                               max_pixels=cfg.max_pixels, train_mask=image_id in train)
        except BadInputError as err:
            if cfg.on_bad_input == "error":
                raise
            quarantine.append({"id": image_id, "file": err.path, "problem": err.problem})
            bad.add(image_id)
            continue
        image_labels[image_id] = (np.flatnonzero(vec) + 1).tolist()
        if cfg.kind == "voc":  # the embedded set is identified by its profile and seed
            contents[image_id] = files_digest(root, image_files(cfg, image_id), "content")
    if quarantine:
        log(f"quarantined {len(quarantine)} image(s); see {out_dir / MANIFEST}")
    splits = {s: [i for i in ids if i not in bad] for s, ids in splits.items()}
    for split, ids in splits.items():
        if not ids:
            raise BadInputError(root / lists[split], f"no usable image left in the {split} list")
    manifest = Manifest(rel_root, space, splits, image_labels, cfg.seg_dir, cfg.eval_seg_dir, quarantine, contents)
    manifest.save(out_dir)
    return Manifest.load(out_dir)
