"""Peak memory of EvalSegmentation's prediction of one large val image (``python -m bench.large_images``).

The issue 15 case: a 4000x3000 val image, 21 classes, the ``tiny`` preset's evaluation (DeepLab-v2 on
``resnet_mini``, single scale, no flip, the deeplab_test CRF on pydensecrf). Peak RSS of ``predict_labels`` above
the process's level once model and image are loaded, in a fresh process per variant: without a limit
(``max_pixels = 0``: every score map and the CRF at 12 MP) against the default ``[EvalSegmentation] max_pixels``
(predicted at that many pixels, labels upsampled), with a VOC-size 500x375 image as the baseline. The figures are
ratios against that baseline; the bound itself is the default's figure, which does not grow with the image.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import PeakMemory, in_fresh_process  # noqa: E402

CLASSES = 21
VARIANTS = {  # name: (height, width, max_pixels or None for the default)
    "voc_500x375": (375, 500, None),
    "4000x3000_unbounded": (3000, 4000, 0),
    "4000x3000_bounded": (3000, 4000, None),
}


def measure(name: str) -> dict:
    """One variant in this process: peak MiB of predict_labels and the process's own high-water mark."""
    import cv2
    import torch

    from data.synthetic import PROFILES, render_sample
    from models.segmenters import create_segmenter
    from stages.config import EvalSegmentationConfig
    from stages.segmentation.predict import predict_labels

    height, width, max_pixels = VARIANTS[name]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_segmenter("deeplabv2", "resnet_mini", CLASSES, freeze_bn=True).eval()
    rgb = cv2.resize(render_sample(0, "val", 3, PROFILES["large"]).image, (width, height),
                     interpolation=cv2.INTER_LINEAR)
    cfg = EvalSegmentationConfig(scales=(1.0,), flip=False, crf=True)
    if max_pixels is not None:
        cfg = EvalSegmentationConfig(scales=(1.0,), flip=False, crf=True, max_pixels=max_pixels)
    start = time.perf_counter()
    with PeakMemory() as peak:
        raw, final = predict_labels(model, rgb, cfg, torch.device("cpu"), "pydensecrf")
    assert raw.shape == final.shape == (height, width)
    return {"peak_mib": round(peak.peak / 2**20, 1), "method": peak.method,
            "process_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(time.perf_counter() - start, 2), "max_pixels": cfg.max_pixels}


def bench_large_images() -> dict:
    out = {name: in_fresh_process("bench.large_images", "--variant", name) for name in VARIANTS}
    base = out["voc_500x375"]["peak_mib"]
    for name in VARIANTS:
        out[name]["x_voc"] = round(out[name]["peak_mib"] / base, 2)
    out["bounded_vs_unbounded"] = round(out["4000x3000_bounded"]["peak_mib"]
                                        / out["4000x3000_unbounded"]["peak_mib"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="measure one variant in this process")
    args = parser.parse_args()
    print(json.dumps(measure(args.variant) if args.variant else bench_large_images()))


if __name__ == "__main__":
    main()
