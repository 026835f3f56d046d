"""Every propagation method, per image, against a straightforward dense implementation of the same method.

One run, two images: the demo profile's size (112x144) and VOC's typical 500x375. Each row comes from the
method's own bench, which builds deterministic synthetic inputs and measures each side in a fresh process
(wall time, and peak resident memory above the state before the call):

- rw_irn (bench/random_walk.py): the sparse x <- x T walk, t steps (16 on demo, 256 at 500x375), against IRN's
  T^t by log2(t) dense N x N squarings.
- gcn (bench/gcn.py): T^t kept to the top 512 entries per column against WSGCN's dense T^t; both sides run the
  whole method (partial labels, adjacency, 250-epoch GCN).
- a2gnn (bench/a2gnn.py): window attention and the window walk against N x N attention matrices and T^64 by
  squaring (the reference's formulation).
- graphcut (bench/graph_labels.py): DGCN's label step, blockwise kNN plus one vectorised grid graph cut per
  class, against N x N cdist, a dense kNN matrix and per-node edges from its row (hustvl/DGCN).
- dsrg (bench/graph_labels.py): DSRG's growing, vectorised, against a per-pixel Python loop and a Python BFS per
  class (speedinghzl/DSRG).

graphcut/dsrg work on the seed net's stride-8 output with 1,280-d features (DGCN's layer1 + layer3): the demo
rows are one image of a batch of 8 at 14x14 (112 crop; peak memory is the batch's), the 500x375 rows one whole
image at 47x63 (``python -m bench.graph_labels`` also runs a full-resolution 375x500 grid). a2gnn at 500x375
runs 5 + 5 epochs instead of 50 + 50 (the dense side needs minutes per epoch-hundred); its seconds are
extrapolated to the full schedule from the measured ms per epoch. Agreement: % of pixels with the same label
(graphcut: of the cut's segments).

``python -m bench.propagation`` (``--images demo`` for the quick half) prints the table and writes
``bench/results/propagation.json``; ``make bench`` includes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.a2gnn import bench_a2gnn  # noqa: E402
from bench.gcn import bench_dense_products, bench_gcn, dense_product_lines  # noqa: E402
from bench.graph_labels import bench_graph_labels  # noqa: E402
from bench.random_walk import bench_random_walk  # noqa: E402

IMAGES = ("demo", "voc")
# graph_labels' grid for each image: the seed net's output grid (stride 8) on a demo crop and on a 500x375 image.
GRAPH_GRIDS = {"demo": "14x14", "voc": "47x63"}
# A2GNN's reference schedule for image labels: 50 + 50 epochs.
A2GNN_EPOCHS = 100


def _row(method: str, image: str, ours_s: float, base_s: float, ours_mib: float, base_mib: float,
         agreement: float | None, note: str = "") -> dict:
    return {"method": method, "image": image, "ours_s": ours_s, "dense_s": base_s, "speedup": base_s / ours_s,
            "ours_peak_mib": ours_mib, "dense_peak_mib": base_mib, "agreement_pct": agreement, "note": note}


def bench_propagation(images: tuple[str, ...] = IMAGES) -> dict:
    """Rows (method, image) with seconds and peak MiB per image of ours and the dense baseline; and each
    method's full figures."""
    unknown = set(images) - set(IMAGES)
    if unknown:
        raise ValueError(f"unknown images {sorted(unknown)}; choose from {', '.join(IMAGES)}")
    walk, gcn, a2gnn = bench_random_walk(images), bench_gcn(images), bench_a2gnn(images)
    labels = bench_graph_labels(tuple(GRAPH_GRIDS[i] for i in images))
    rows = []
    for image in images:
        w = walk[image]
        rows.append(_row("rw_irn", f"{w['size']} ({w['nodes']} nodes, t {w['walk_steps']})", w["sparse_s"],
                         w["dense_s"], w["sparse_peak_mib"], w["dense_peak_mib"], w["label_agreement_pct"]))
        g = gcn[image]
        rows.append(_row("gcn", f"{g['size']} ({g['nodes']} nodes, t {g['walk_steps']})", g["topk_s"], g["dense_s"],
                         g["topk_peak_mib"], g["dense_peak_mib"], g["label_agreement_pct"],
                         f"top {g['topk']} per column"))
        a = a2gnn[image]
        missing = A2GNN_EPOCHS - a["epochs"]  # the 500x375 image trains fewer: add the rest at the measured rate
        rows.append(_row("a2gnn", f"{a['size']} ({a['nodes']} nodes)",
                         a["window_s"] + missing * a["window_ms_per_epoch"] / 1000,
                         a["dense_s"] + missing * a["dense_ms_per_epoch"] / 1000, a["window_peak_mib"],
                         a["dense_peak_mib"], a["label_agreement_pct"],
                         f"{a['epochs']} epochs measured, extrapolated to {A2GNN_EPOCHS}" if missing else ""))
        grid = GRAPH_GRIDS[image]
        knn, cut, grow = labels[f"{grid}/knn"], labels[f"{grid}/cut"], labels[f"{grid}/dsrg"]
        # Where the baseline's N x N matrices cannot be built, their size stands in for its peak memory.
        dense_mib = (knn["baseline_dense_matrices_gb"] * 1e9 / 2**20 if "baseline_dense_matrices_gb" in knn
                     else max(knn["baseline_peak_mib"], cut["baseline_peak_mib"]))
        extrapolated = knn["baseline_extrapolated"] or cut["baseline_extrapolated"] or knn["ours_extrapolated"]
        rows.append(_row("graphcut", f"grid {grid}", knn["ours_s"] + cut["ours_s"],
                         knn["baseline_s"] + cut["baseline_s"],
                         max(knn["ours_peak_mib"], cut["ours_peak_mib"]), dense_mib, cut.get("cut_agreement_pct"),
                         "baseline extrapolated, its N x N matrices analytic" if extrapolated else ""))
        rows.append(_row("dsrg", f"grid {grid}", grow["ours_s"], grow["baseline_s"], grow["ours_peak_mib"],
                         grow["baseline_peak_mib"], grow.get("label_agreement_pct"),
                         "baseline extrapolated" if grow["baseline_extrapolated"] else ""))
    return {"rows": rows, "random_walk": walk, "gcn": gcn, "gcn_dense_product": bench_dense_products(),
            "a2gnn": a2gnn, "graph_labels": labels}


def printed(results: dict) -> str:
    """What ``python -m bench.propagation`` and ``make bench`` print of :func:`bench_propagation`'s results."""
    return "\n".join([table(results["rows"]), *dense_product_lines(results["gcn_dense_product"])])


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the README's form)."""
    lines = ["| method | image | ours s/image | dense s/image | speed-up | ours peak MiB | dense peak MiB | "
             "agreement % | note |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        agreement = "" if r["agreement_pct"] is None else f"{r['agreement_pct']:.2f}"
        lines.append(f"| {r['method']} | {r['image']} | {r['ours_s']:.3g} | {r['dense_s']:.3g} | {r['speedup']:.3g}× | "
                     f"{r['ours_peak_mib']:.4g} | {r['dense_peak_mib']:.4g} | {agreement} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=",".join(IMAGES), help="comma-separated: demo, voc")
    args = parser.parse_args()
    results = bench_propagation(tuple(args.images.split(",")))
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "propagation.json").write_text(json.dumps(results, indent=1))
    print(printed(results))


if __name__ == "__main__":
    main()
