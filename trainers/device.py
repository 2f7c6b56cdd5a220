"""The trainers' ``--device`` flag: checked when parsed, so a bad name or a missing GPU is one
line from argparse instead of a traceback from deep inside torch."""

from __future__ import annotations

import argparse

import torch


def add_device_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", type=device_name, default=default,
                   help=f"torch device: cpu, cuda or cuda:N (default here: {default})")


def device_name(value: str) -> str:
    """``value`` if torch can train on it here, else an argparse error that says why."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value!r}: no CUDA device here (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{value!r}: the trainers run on cpu or cuda")
    return value
