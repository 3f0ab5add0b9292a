"""``train.compile``: torch.compile of a method's networks, or eager with a warning that says why."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile's default backend (inductor) cannot build kernels for ``device``, or None."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (pip install triton)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # a private API: any failure means inductor cannot compile here
        return f"no C++ compiler found for inductor's CPU kernels ({err}); install g++ or set CXX"
    return None


def compile_networks(networks: list[nn.Module], device: torch.device) -> bool:
    """Compile each module in place (``nn.Module.compile``: state-dict keys, and so checkpoints
    and exports, stay as they are); returns whether they were compiled.

    Where inductor cannot run, warns and leaves them eager. A function that fails to compile later
    also runs eagerly (``torch._dynamo.config.suppress_errors``), and torch logs a warning for it.
    """
    reason = compile_unavailable(device)
    if reason is not None:
        warnings.warn(f"train.compile=true, but {reason}: training without torch.compile (slower)",
                      RuntimeWarning, stacklevel=2)
        return False
    torch._dynamo.config.suppress_errors = True
    for network in networks:
        network.compile()
    return True
