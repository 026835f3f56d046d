"""Optimiser construction shared by every trainer (CAM, SEAM, affinity nets).

Models describe their parameters as groups ``{"params": [...], "lr_mult": float, "decay": bool}``:
PSA/SEAM give pretrained weights 1x, pretrained biases 2x (no decay), new weights 10x and new biases 20x;
IRN gives the backbone 1x and the head 10x. The schedule is poly decay per step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

ParamGroup = dict


def make_optimizer(groups: Iterable[ParamGroup], *, lr: float, optimizer: str = "sgd", momentum: float = 0.9,
                   weight_decay: float = 1e-4, momentum_quirk: bool = False) -> torch.optim.Optimizer:
    """SGD (or AdamW) over ``groups``; each group's LR is ``lr * lr_mult`` and decays from there."""
    torch_groups = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        group_lr = lr * g.get("lr_mult", 1.0)
        torch_groups.append({"params": params, "lr": group_lr, "initial_lr": group_lr,
                             "weight_decay": weight_decay if g.get("decay", True) else 0.0})
    if not torch_groups:
        raise ValueError("the model has no trainable parameters")
    if optimizer == "adamw":
        return torch.optim.AdamW(torch_groups, lr=lr)
    if optimizer != "sgd":
        raise ValueError(f"optimizer = {optimizer!r}; choose sgd or adamw")
    # PSA, IRN and SEAM pass weight decay positionally into SGD's momentum slot: momentum ~ 0.
    return torch.optim.SGD(torch_groups, lr=lr, momentum=weight_decay if momentum_quirk else momentum)


def poly_lr(optimizer: torch.optim.Optimizer, step: int, total: int, power: float) -> None:
    """lr_t = lr_0 * (1 - t/T)^power for every group."""
    factor = max(0.0, 1 - step / total) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
