"""DDD's grid CRF layer (``python -m bench.ddd``): the vectorised chain DP against a per-chain Python loop.

The baseline, :func:`naive_dual_decomposition`, is the reference's structure written plainly: for every image,
every distance d, every phase grid x[i::d, j::d] and every row and column of it, one chain DP call, the marginals
scattered back pixel by pixel (the same outputs as :func:`models.ddd.dual_decomposition`, checked here and in
tests/test_ddd.py).

Cases (batch, classes, grid; K = 2, 5 passes, gamma = 2): ``voc`` 8 x 21 x 33x33 (OS16 on a 513 crop), ``os8``
8 x 21 x 65x65, ``demo`` 10 x 11 x 14x14 (the demo crop at OS8), ``parts58`` and ``parts108`` at 33x33 (batch 2 on
the CPU: plain autograd at batch 8 would need ~16 GB at C = 108). Sides: ``function`` (the layer:
:class:`models.ddd.ChainMarginals`, recompute in backward), ``autograd`` (the same vectorised DP, plain autograd)
and ``loop`` (the per-chain loop; it loops over images, so it runs the case's first image only and its figures are
per image, its ratios against the others' per-image time).

Each (case, side) runs in a fresh process, on one thread on the CPU (the machine is shared: two threads on a
loaded host wait on each other at every small op). After a 3x3 warm-up that loads the code paths: the memory the
autograd graph holds after the forward (``graph_mib``) and the peak of forward + backward (``train_peak_mib``),
resident memory above the state with the potentials built (CPU) or allocated memory (CUDA); then forward seconds
(no grad) and forward + backward seconds, each the median of ``repeat`` runs after a warm-up. Both memories
include what the sides share (the gathered pairwise tables and their gradients, O(B K H W C^2)); the graph's is
closest to "what each pass keeps". Ratios from one run: loop / layer time per image, layer / autograd memory
(target <= 0.25). The three sides' outputs are compared on the case's first image (asserted <= 1e-4). ``demo``
also times the host: one training step of ``deeplabv3`` and of ``deeplabv3_ddd`` on the demo's ``resnet_mini``
(OS8, crop 112, batch 10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import PeakMemory, in_fresh_process  # noqa: E402
from models.ddd import GridPairs, chain_marginals, dual_decomposition, smax  # noqa: E402

# name: (batch on CUDA, batch on the CPU, classes, height, width)
CASES = {"voc": (8, 8, 21, 33, 33), "os8": (8, 8, 21, 65, 65), "demo": (10, 10, 11, 14, 14),
         "parts58": (8, 2, 58, 33, 33), "parts108": (8, 2, 108, 33, 33)}
SIDES = ("function", "autograd", "loop")


def _naive_pass(unary: Tensor, pairs: GridPairs, copies: list[Tensor], gamma: float
                ) -> tuple[list[Tensor], float]:
    """One image: every copy's max-marginals (C, H, W) chain by chain, and the dual."""
    _, h, w = unary.shape
    marginals, dual = [], 0.0
    for t, u in enumerate(copies):
        d, vertical = t // 2 + 1, t % 2 == 1
        table = pairs[d - 1][1 if vertical else 0]
        m = torch.zeros_like(u)
        for i in range(min(d, h)):           # phase grid x[i::d, j::d]
            for j in range(min(d, w)):
                lines = range(len(range(j, w, d))) if vertical else range(len(range(i, h, d)))
                for k in lines:              # its columns (vertical) or rows (horizontal)
                    if vertical:
                        x = j + d * k
                        ys = slice(i, h, d)
                        cu, cp = u[:, ys, x], table[:, :, i::d, x]
                        cp = cp[:, :, :cu.shape[1] - 1]
                    else:
                        y = i + d * k
                        xs = slice(j, w, d)
                        cu, cp = u[:, y, xs], table[:, :, y, j::d]
                        cp = cp[:, :, :cu.shape[1] - 1]
                    cm = chain_marginals(cu.T[:, None], cp.permute(2, 0, 1)[:, None], gamma)[:, 0].T
                    if vertical:
                        m[:, ys, x] = cm
                    else:
                        m[:, y, xs] = cm
                    dual += float(smax(cm[:, 0].detach(), gamma, 0))
        marginals.append(m)
    return marginals, dual


def _naive_image(unary: Tensor, pairs: GridPairs, gamma: float, iterations: int, alpha: float,
                 early_stop: float | None) -> Tensor:
    copies_count = 2 * len(pairs)
    copies = [unary / copies_count for _ in range(copies_count)]
    alpha = alpha or 1.0 / max(unary.shape[1:])
    marginals, dual = _naive_pass(unary, pairs, copies, gamma)
    output = sum(marginals)
    for _ in range(iterations - 1):
        mean = sum(marginals) / copies_count
        copies = [u - alpha * (m - mean) for u, m in zip(copies, marginals)]
        marginals, new_dual = _naive_pass(unary, pairs, copies, gamma)
        if early_stop is not None and new_dual - dual >= early_stop:
            break
        output, dual = sum(marginals), new_dual
    return output


def naive_dual_decomposition(unary: Tensor, pairs: GridPairs, gamma: float = 2.0, iterations: int = 5,
                             alpha: float = 0.0, early_stop: float | None = 1e-4) -> Tensor:
    """:func:`models.ddd.dual_decomposition` with a Python loop over images, copies, phase grids and chains."""
    return torch.stack([_naive_image(unary[b], [(hz[b], vt[b]) for hz, vt in pairs], gamma, iterations, alpha,
                                     early_stop) for b in range(unary.shape[0])])


def case_inputs(case: str, device: torch.device, seed: int = 0) -> tuple[Tensor, GridPairs]:
    """Unary N(0, 1) and pairwise tables N(0, 0.3^2): a learned CRF's range after training, not the flat init."""
    cuda_batch, cpu_batch, c, h, w = CASES[case]
    b = cuda_batch if device.type == "cuda" else cpu_batch
    g = torch.Generator().manual_seed(seed)
    unary = torch.randn(b, c, h, w, generator=g)
    pairs = [(0.3 * torch.randn(b, c, c, h, w - d, generator=g), 0.3 * torch.randn(b, c, c, h - d, w, generator=g))
             for d in (1, 2)]
    return unary.to(device), [(hz.to(device), vt.to(device)) for hz, vt in pairs]


def run_side(side: str, unary: Tensor, pairs: GridPairs) -> Tensor:
    if side == "loop":
        return naive_dual_decomposition(unary, pairs)
    return dual_decomposition(unary, pairs, backend=side)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, device: torch.device, repeat: int) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_side(case: str, side: str, device: torch.device, repeat: int) -> dict:
    """Peak MiB of forward + backward (measured first, in a fresh process), seconds forward and seconds forward +
    backward, for one side of a case (the loop: its first image)."""
    unary, pairs = case_inputs(case, device)
    if side == "loop":
        unary, pairs = unary[:1], [(hz[:1], vt[:1]) for hz, vt in pairs]
    inputs = [unary] + [t for hv in pairs for t in hv]
    leaves = [t.clone().requires_grad_() for t in inputs]
    leaf_pairs = [(leaves[1], leaves[2]), (leaves[3], leaves[4])]

    def forward():
        with torch.no_grad():
            run_side(side, unary, pairs)

    def train():
        run_side(side, leaves[0], leaf_pairs).sum().backward()
        for t in leaves:
            t.grad = None
    tiny = [t.clone().requires_grad_() for t in [unary[:1, :, :3, :3]] +
            [x for d, (hz, vt) in enumerate(pairs, 1) for x in (hz[:1, ..., :3, :3 - d], vt[:1, ..., :3 - d, :3])]]
    run_side(side, tiny[0], [(tiny[1], tiny[2]), (tiny[3], tiny[4])]).sum().backward()   # load code, start threads
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run_side(side, leaves[0], leaf_pairs)
        graph = torch.cuda.memory_allocated() - base
        out.sum().backward()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        process = psutil.Process()
        with PeakMemory() as memory:
            base = process.memory_info().rss
            out = run_side(side, leaves[0], leaf_pairs)
            graph = process.memory_info().rss - base
            out.sum().backward()
        peak = memory.peak
    del out
    for t in leaves:
        t.grad = None
    return {"batch": unary.shape[0], "train_peak_mib": peak / 2**20, "graph_mib": graph / 2**20,
            "forward_s": _median_seconds(forward, device, repeat), "train_s": _median_seconds(train, device, repeat)}


def agreement(case: str, device: torch.device) -> float:
    """The largest difference between the sides' logits on the case's first image."""
    unary, pairs = case_inputs(case, device)
    unary, pairs = unary[:1], [(hz[:1], vt[:1]) for hz, vt in pairs]
    with torch.no_grad():
        outputs = [run_side(side, unary, pairs) for side in SIDES]
    return max(float((o - outputs[0]).abs().max()) for o in outputs[1:])


def _host_step(name: str, device: torch.device):
    """One SGD step of segmenter ``name`` on the demo's resnet_mini at OS8 (crop 112, batch 10, 11 classes)."""
    from models.segmenters import create_segmenter
    from stages.segmentation.train import segmentation_loss

    torch.manual_seed(0)
    net = create_segmenter(name, "resnet_mini", 11, freeze_bn=False, output_stride=8).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(10, 3, 112, 112, device=device)
    y = torch.randint(0, 11, (10, 112, 112), device=device)

    def step():
        loss = segmentation_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def host_steps(device: torch.device, repeat: int) -> dict:
    """Seconds per training step of the demo's plain DeepLab-v3 and of deeplabv3_ddd."""
    return {f"{name}_step_s": _median_seconds(_host_step(name, device), device, repeat)
            for name in ("deeplabv3", "deeplabv3_ddd")}


def bench_ddd(cases: tuple[str, ...] = tuple(CASES), device: str = "cpu", repeat: int = 3) -> dict:
    """Per case: each side's figures (fresh processes), the ratios and the agreement."""
    results: dict = {"device": device}
    for case in cases:
        row = {side: in_fresh_process("bench.ddd", "--worker", case, side, "--device", device,
                                      "--repeat", str(repeat)) for side in SIDES}
        diff = agreement(case, torch.device(device))
        if diff > 1e-4:
            raise AssertionError(f"{case}: the sides disagree by {diff:.3g}")
        f, a, loop = row["function"], row["autograd"], row["loop"]
        _, _, c, h, w = CASES[case]
        per_image = f["batch"] / loop["batch"]
        row.update({"shape": f"B {f['batch']}, C {c}, {h}x{w}", "max_abs_diff": diff,
                    "speedup_fwd_vs_loop": loop["forward_s"] * per_image / f["forward_s"],
                    "speedup_train_vs_loop": loop["train_s"] * per_image / f["train_s"],
                    "memory_function_vs_autograd": f["train_peak_mib"] / a["train_peak_mib"],
                    "graph_function_vs_autograd": f["graph_mib"] / a["graph_mib"]})
        results[case] = row
    if "demo" in cases:
        host = in_fresh_process("bench.ddd", "--worker", "host", "-", "--device", device, "--repeat", str(repeat))
        host["ddd_train_vs_host_step"] = results["demo"]["function"]["train_s"] / host["deeplabv3_step_s"]
        host["ddd_step_vs_deeplabv3_step"] = host["deeplabv3_ddd_step_s"] / host["deeplabv3_step_s"]
        results["host"] = host
    return results


def table(results: dict) -> str:
    lines = ["| case | shape | fwd s (layer / loop per image) | fwd+bwd s (layer / autograd / loop per image) | "
             "graph MiB (layer / autograd) | fwd+bwd peak MiB (layer / autograd / loop per image) | "
             "loop / layer fwd+bwd time | layer / autograd graph, peak | max diff |",
             "|---|---|---|---|---|---|---:|---:|---:|"]
    for case in CASES:
        if case not in results:
            continue
        r = results[case]
        f, a, loop = r["function"], r["autograd"], r["loop"]
        lines.append(f"| {case} | {r['shape']} | {f['forward_s']:.3g} / {loop['forward_s']:.3g} | "
                     f"{f['train_s']:.3g} / {a['train_s']:.3g} / {loop['train_s']:.3g} | "
                     f"{f['graph_mib']:.4g} / {a['graph_mib']:.4g} | "
                     f"{f['train_peak_mib']:.4g} / {a['train_peak_mib']:.4g} / {loop['train_peak_mib']:.4g} | "
                     f"{r['speedup_train_vs_loop']:.3g}× | {r['graph_function_vs_autograd']:.3g}, "
                     f"{r['memory_function_vs_autograd']:.3g} | "
                     f"{r['max_abs_diff']:.2g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.worker:
        torch.set_num_threads(1)
        case, side = args.worker
        figures = host_steps(device, args.repeat) if case == "host" else measure_side(case, side, device, args.repeat)
        print(json.dumps(figures))
        return
    results = bench_ddd(tuple(args.cases.split(",")), args.device, args.repeat)
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "ddd.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    if "host" in results:
        print(json.dumps(results["host"]))


if __name__ == "__main__":
    main()
