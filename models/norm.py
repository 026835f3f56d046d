"""Normalisation helpers shared by the networks."""

from __future__ import annotations

from torch import nn


def batchnorm_eval(module: nn.Module) -> None:
    """Put every BatchNorm inside ``module`` on its running statistics (the references' frozen BN).

    Call it after ``module.train()``: that call switches them back to batch statistics.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
