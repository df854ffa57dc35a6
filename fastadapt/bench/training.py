"""Trained adapter parameters for benchmarks: a few AdamW steps away from PEFT's init.

At init OFT's Q, LoRA's B and several other adapters' factors are zero, so the adapter is the
identity and some costs vanish (a Neumann series of a zero matrix, a rank-r product with a zero
factor).  Every benchmark case therefore starts from parameters that ``train_adapter_`` moved
away from init the way a fine-tuning run does, not from init and not from a random perturbation
(which has no reason to have a trained adapter's structure or size).

The training: ``steps`` AdamW steps (lr ``lr``, PyTorch's default betas and weight decay 0.01) on
a random regression loss, mean((module(example) - target)^2), with target = the module's output
at init plus Gaussian noise of the same standard deviation; one fixed ``example`` and target, the
module in training mode (dropout active), every random draw from ``seed``.  Adam moves each
parameter by about ``lr`` per step whatever its gradient's scale, so after the default 5 steps at
lr 1e-3 each adapter entry has moved by up to 5e-3 from init (OFT b=256: ||Q||_2 about 0.1, well
inside the Neumann series' convergence radius).
"""
from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import nn

TRAIN_STEPS = 5
TRAIN_LR = 1e-3
TRAIN_SEED = 0
# Rows of the example a layer case trains on (its own draw, not the benchmark's input).
TRAIN_TOKENS = 256


def _output_tensor(out) -> torch.Tensor:
    """The tensor to regress: the output itself, or a model output's ``logits``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"train_adapter_ needs the module to return a tensor or an object with .logits, "
                    f"got {type(out).__name__}")


def train_adapter_(module: nn.Module, example: Union[torch.Tensor, Mapping], *, steps: int = TRAIN_STEPS,
                   lr: float = TRAIN_LR, seed: int = TRAIN_SEED) -> nn.Module:
    """Move ``module``'s trainable parameters ``steps`` AdamW steps away from where they are (in place).

    example: the input, a tensor (``module(example)``) or a mapping of keyword arguments
        (``module(**example)``, e.g. ``{"input_ids": ...}`` for a causal LM; its ``logits`` are
        regressed).
    steps, lr, seed: AdamW steps, learning rate, and the seed of the target noise and of every
        dropout mask drawn while training (the global generators are restored afterwards).
    Returns ``module`` with ``.grad`` of every parameter set to None and its training flag as it
    was.  Only parameters with ``requires_grad`` move (the frozen base never does).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative integer, e.g. steps={TRAIN_STEPS}")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be positive, e.g. lr={TRAIN_LR}")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to train")
    if steps == 0:
        return module

    def run():
        out = module(**example) if isinstance(example, Mapping) else module(example)
        return _output_tensor(out).float()

    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    was_training = module.training
    module.train()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with torch.no_grad():
                start = run()
                noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(seed))
                target = start + start.std() * noise.to(start.device)
            optimizer = torch.optim.AdamW(params, lr=lr)
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = (run() - target).pow(2).mean()
                loss.backward()
                optimizer.step()
    finally:
        module.train(was_training)
    for p in params:
        p.grad = None
    return module
