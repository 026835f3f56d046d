"""DeepLab training throughput (``python -m bench.segmentation``).

CPU: DeepLab-v2 and -v3+ on the demo's ``resnet_mini`` at the demo crop (112) and batch (10), images/s,
against the CAM network's training step on the same backbone (the baseline). CUDA, when present:
DeepLab-v2 ResNet-101 MSC at deeplab-pytorch's crop 321, batch 5, with AMP (bfloat16) and channels-last,
against float32 in the default layout (:func:`precision_step_rates`, also what ``make gpu-check`` runs).
"""

from __future__ import annotations

import json
import time

import torch

from models.cam import CAMNet
from models.resnet import create_backbone
from models.segmenters import create_segmenter
from stages.segmentation.train import segmentation_loss


def _images_per_s(step, batch: int, device: torch.device, repeat: int) -> float:
    step()  # warm-up (cuDNN autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeat / (time.perf_counter() - start)


def _segmenter_step(name: str, backbone: str, classes: int, batch: int, crop: int, device: torch.device,
                    amp: bool = False, channels_last: bool = False, msc: bool = False):
    net = create_segmenter(name, backbone, classes, freeze_bn=False, msc=msc).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, crop, crop, device=device).to(memory_format=fmt)
    y = torch.randint(0, classes, (batch, crop, crop), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = segmentation_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def precision_step_rates(device: torch.device, backbone: str = "resnet101", classes: int = 21, batch: int = 5,
                         crop: int = 321, repeat: int = 5, msc: bool = True) -> dict:
    """DeepLab-v2's training step in float32 (default layout) and with AMP (bfloat16) + channels-last: images/s
    of each, their ratio, and on CUDA each one's peak allocated MiB (None on the CPU)."""
    on_cuda = device.type == "cuda"
    out: dict = {"backbone": backbone, "classes": classes, "batch": batch, "crop": crop, "msc": msc}
    for label, fast in (("fp32", False), ("amp_channels_last", True)):
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step = _segmenter_step("deeplabv2", backbone, classes, batch, crop, device, amp=fast, channels_last=fast,
                               msc=msc)
        out[f"{label}_images_per_s"] = _images_per_s(step, batch, device, repeat)
        out[f"{label}_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else None
        del step
    out["speedup_amp_channels_last"] = out["amp_channels_last_images_per_s"] / out["fp32_images_per_s"]
    return out


def bench_segmentation(repeat: int = 5) -> dict:
    cpu = torch.device("cpu")
    batch, crop, classes = 10, 112, 11
    cam = CAMNet(create_backbone("resnet_mini", strides=(1, 2, 1, 1)), classes - 1, freeze_bn=False,
                 frozen_stages=0).train()
    opt = torch.optim.SGD(cam.parameters(), lr=1e-3)
    x, labels = torch.randn(batch, 3, crop, crop), torch.randint(0, 2, (batch, classes - 1)).float()

    def cam_step():
        loss, _ = cam.training_loss(x, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base = _images_per_s(cam_step, batch, cpu, repeat)
    out = {"cpu_threads": torch.get_num_threads(), "batch": batch, "crop": crop,
           "cam_training_images_per_s": base}
    for name in ("deeplabv2", "deeplabv3plus"):
        rate = _images_per_s(_segmenter_step(name, "resnet_mini", classes, batch, crop, cpu), batch, cpu, repeat)
        out[f"{name}_resnet_mini_images_per_s"] = rate
        out[f"{name}_ratio_vs_cam_training"] = base / rate
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        rates = precision_step_rates(torch.device("cuda"), repeat=repeat)
        out.update({"cuda_device": torch.cuda.get_device_name(),
                    "cuda_deeplabv2_r101_msc_fp32_images_per_s": rates["fp32_images_per_s"],
                    "cuda_deeplabv2_r101_msc_amp_channels_last_images_per_s": rates["amp_channels_last_images_per_s"],
                    "cuda_speedup_amp_channels_last": rates["speedup_amp_channels_last"]})
    return out


if __name__ == "__main__":
    print(json.dumps(bench_segmentation(), indent=1))
