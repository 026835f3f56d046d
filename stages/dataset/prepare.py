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


def input_fingerprint(cfg: DatasetConfig) -> dict[str, str]:
    """What identifies an external dataset beyond the config: the content of its id lists."""
    if cfg.kind != "voc":
        return {}
    root = Path(cfg.root)
    facts = {}
    for key in ("train_list", "eval_list", "val_list", "label_space"):
        rel = getattr(cfg, key)
        if rel:
            path = root / rel if key != "label_space" else Path(rel)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
            facts[key] = digest
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
    bad: set[str] = set()
    with_mask = {i for s in ("eval", "val") for i in splits[s]}
    for image_id in dict.fromkeys(i for ids in splits.values() for i in ids):
        try:
            vec = layout.check(image_id, cfg.image_labels_from, with_mask=image_id in with_mask)
        except BadInputError as err:
            if cfg.on_bad_input == "error":
                raise
            quarantine.append({"id": image_id, "file": err.path, "problem": err.problem})
            bad.add(image_id)
            continue
        image_labels[image_id] = (np.flatnonzero(vec) + 1).tolist()
    if quarantine:
        log(f"quarantined {len(quarantine)} image(s); see {out_dir / MANIFEST}")
    splits = {s: [i for i in ids if i not in bad] for s, ids in splits.items()}
    for split, ids in splits.items():
        if not ids:
            raise BadInputError(root / lists[split], f"no usable image left in the {split} list")
    manifest = Manifest(rel_root, space, splits, image_labels, cfg.seg_dir, cfg.eval_seg_dir, quarantine)
    manifest.save(out_dir)
    return Manifest.load(out_dir)
