"""Device choice, seeding and version facts shared by every stage."""

from __future__ import annotations

import hashlib
import platform
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device without CUDA is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available in this process")
    return device


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def versions() -> dict[str, str]:
    import h5py
    import PIL

    facts = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "h5py": h5py.__version__, "pillow": PIL.__version__, "platform": platform.platform(),
        "cuda": torch.version.cuda or "none",
    }
    try:
        import luigi
        facts["luigi"] = luigi.__version__
    except (ImportError, AttributeError):
        pass
    return facts


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit seed from the configured seed and the image id (stable across runs, processes and hosts)."""
    digest = hashlib.sha256(f"{int(seed)}\0{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------- training
