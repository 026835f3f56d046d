"""One training loop for every trained stage, so that resuming a killed run is written (and tested) once.

A stage keeps its science — model, optimiser, data, loss — and hands the loop four functions:

- ``batches(start)``: the micro-batches of optimiser steps ``start .. total-1`` in order. It must be a pure
  function of the stage's seed and ``start`` (or of RNG state the loop restores), so a run that resumes at
  step ``start`` sees exactly the batches an uninterrupted run saw there;
- ``set_lr(step)``: the learning-rate schedule, applied before the first micro-batch of each step;
- ``step_fn(batch) -> (loss, extras)``: forward pass and loss of one micro-batch;
- ``on_step(loop, step, micro) -> message | None``: bookkeeping after optimiser step ``step`` (1-based) with
  each micro-batch's ``(loss value, extras)``: append rows to ``loop.rows``, keep running sums in
  ``loop.carry`` (plain values, checkpointed), raise on a non-finite loss; a returned message goes to
  ``progress`` (Luigi's status) with the percentage done.

Gradients accumulate over ``accumulation`` micro-batches (each loss divided by it) before one optimiser step.
Every ``checkpoint_every`` steps the model, optimiser, step, log rows, ``carry``, elapsed time and the state of
every random generator (torch, numpy, python ``random``, CUDA, and the stage's own torch/numpy generators) go
atomically (temporary file, then ``os.replace``) to ``resume_dir/last.pt``; a later run with the same
``resume_dir`` loads it and continues as if it had never stopped. The generators are restored after the batch
source's iterator is created, because creating a DataLoader iterator draws from them: the restored state is
then the one the uninterrupted run had at that step. ``resume_dir`` lies outside the stage's output directory
(which Luigi replaces atomically) so that it survives a kill.

DDP: the stage wraps its module before building ``step_fn`` (gradients are averaged inside ``backward``) and
passes ``main_process``; only the main process writes checkpoints and reports progress.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.artifacts import RESUME_CHECKPOINT
from stages.runtime import rebalance_threads

StepFn = Callable[[Any], "tuple[torch.Tensor, dict]"]
OnStep = Callable[["TrainingLoop", int, "list[tuple[float, dict]]"], "str | None"]
ProgressFn = Callable[[float, str], None]


@dataclass
class LoopResult:
    """How a run ended: ``step`` optimiser steps done, resumed from ``resumed_from``; ``stopped`` by stop_after."""

    step: int
    resumed_from: int
    stopped: bool
    seconds: float


@dataclass
class TrainingLoop:
    """See the module docstring. ``rows`` and ``carry`` may be read and changed by ``on_step``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    total_steps: int
    batches: Callable[[int], Iterable]
    set_lr: Callable[[int], None]
    step_fn: StepFn
    on_step: OnStep
    accumulation: int = 1
    checkpoint_every: int = 0
    resume_dir: str | os.PathLike | None = None
    progress: ProgressFn | None = None
    desc: str = "training"
    torch_generators: Sequence[torch.Generator] = ()
    numpy_generators: Sequence[np.random.Generator] = ()
    main_process: bool = True
    stop_after: int | None = None
    rows: list[dict] = field(default_factory=list)
    carry: dict = field(default_factory=dict)
    _began: float = 0.0

    @property
    def resume_path(self) -> Path | None:
        return Path(self.resume_dir) / RESUME_CHECKPOINT if self.resume_dir else None

    def seconds(self) -> float:
        """Training time so far, including the time before a resume."""
        return round(time.time() - self._began, 2)

    def run(self) -> LoopResult:
        """Train to ``total_steps`` (or ``stop_after``), resuming from ``resume_dir`` when it holds a checkpoint."""
        from tqdm import tqdm

        start, rng_state = self._load()
        self._began = time.time() - self.carry.pop("_elapsed", 0.0)
        if start and self.progress and self.main_process:
            self.progress(100.0 * start / self.total_steps, f"resumed at step {start}/{self.total_steps}")
        source = iter(self.batches(start))
        if rng_state is not None:
            self._set_rng(rng_state)
        bar = tqdm(total=self.total_steps, initial=start, desc=self.desc, file=sys.stderr, mininterval=10,
                   disable=None if self.main_process else True)
        step = start
        try:
            while step < self.total_steps:
                micro = self._train_step(step, source)
                step += 1
                bar.update(1)
                self._after_step(step, micro)
                if self.stop_after is not None and step >= self.stop_after:
                    return LoopResult(step, start, True, self.seconds())
        finally:
            bar.close()
        return LoopResult(step, start, False, self.seconds())

    # ------------------------------------------------------------------------------------------ one step

    def _train_step(self, step: int, source) -> list[tuple[float, dict]]:
        micro: list[tuple[float, dict]] = []
        self.set_lr(step)
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.accumulation):
            try:
                batch = next(source)
            except StopIteration:
                raise RuntimeError(f"{self.desc}: the batch source ran out at step {step} of "
                                   f"{self.total_steps}") from None
            loss, extras = self.step_fn(batch)
            if self.accumulation > 1:
                loss = loss / self.accumulation
            loss.backward()
            micro.append((float(loss.item()), extras))
        self.optimizer.step()
        return micro

    def _after_step(self, step: int, micro: list[tuple[float, dict]]) -> None:
        rebalance_threads()
        message = self.on_step(self, step, micro)
        if message is not None and self.progress and self.main_process:
            self.progress(100.0 * step / self.total_steps, message)
        if self.resume_path and self.checkpoint_every and step % self.checkpoint_every == 0 \
                and step < self.total_steps and self.main_process:
            self._save(step)

    # ------------------------------------------------------------------------------------------ checkpoint

    def _save(self, step: int) -> None:
        path = self.resume_path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                 "rows": self.rows, "carry": {**self.carry, "_elapsed": time.time() - self._began},
                 "rng": self._get_rng()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _load(self) -> tuple[int, dict | None]:
        path = self.resume_path
        if path is None or not path.is_file():
            return 0, None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "step" not in state:
            raise ValueError(f"{path}: not a checkpoint of stages.training.engine (an older format?); delete it "
                             "to train from the start")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rows, self.carry = list(state["rows"]), dict(state["carry"])
        return int(state["step"]), state["rng"]

    # ------------------------------------------------------------------------------------------ RNG state

    def _get_rng(self) -> dict:
        """Every generator's state as tensors and plain values (so ``weights_only`` loading works)."""
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
                "python": [version, list(internal), gauss_next],
                "torch_generators": [g.get_state() for g in self.torch_generators],
                "numpy_generators": [json.dumps(g.bit_generator.state) for g in self.numpy_generators]}

    def _set_rng(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        for g, s in zip(self.torch_generators, state["torch_generators"], strict=True):
            g.set_state(s)
        for g, s in zip(self.numpy_generators, state["numpy_generators"], strict=True):
            g.bit_generator.state = json.loads(s)


def epoch_batches(loop: TrainingLoop, loader: Iterable, per_epoch: int, start: int,
                  begin_epoch: Callable[[int], None], generator: torch.Generator | None = None) -> Iterator:
    """A ``batches(start)`` source for epoch-based stages: ``begin_epoch(epoch)`` (set the dataset's and
    sampler's epoch, ``model.train()``), then the loader's ``per_epoch`` batches, from step ``start`` on.

    A shuffling loader draws its order from ``generator`` when its iterator is created; the generator's state
    at the start of each epoch is kept in ``loop.carry``, so a resume in mid-epoch reshuffles identically and
    skips the batches already trained on (loading them: resume at epoch ends to avoid that)."""
    first, skip = divmod(start, per_epoch)
    for epoch in range(first, math.ceil(loop.total_steps / per_epoch)):
        if generator is not None:
            if skip:
                generator.set_state(loop.carry["epoch_rng"])
            loop.carry["epoch_rng"] = generator.get_state()
        begin_epoch(epoch)
        batches = iter(loader)
        for k in range(per_epoch):
            batch = next(batches)
            if k == per_epoch - 1:
                # Run the loader to its end before the last step, so that a checkpoint after that step holds
                # the generator state the next epoch starts from (a sampler may draw when it finishes).
                if next(batches, None) is not None:
                    raise RuntimeError(f"the loader gives more than the {per_epoch} batches of an epoch")
            if k >= skip:
                yield batch
        skip = 0
