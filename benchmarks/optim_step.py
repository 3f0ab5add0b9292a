"""Time one optimiser step over a ResNet-50's parameters: lightly's LARS against sslkit's, and
torch's SGD fused against foreach.

Only the step is timed (random gradients, no forward or backward), so the numbers do not
depend on the batch size: milliseconds per step, the median of ``--repeats`` steps after
``--warmup`` untimed ones. Groups as sslkit builds them: decayed weights (trust-ratio scaled by
LARS) and biases/norms without decay. On CUDA when available, else on the CPU.

    python benchmarks/optim_step.py
    python benchmarks/optim_step.py --repeats 50 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import timm
import torch
from lightly.utils.lars import LARS as LightlyLARS
from torch import nn

from sslkit.engine.lars import LARS
from sslkit.engine.optim import param_groups


def time_step(step: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``step()`` in milliseconds, the device's queue drained around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per optimiser (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    model: nn.Module = timm.create_model("resnet50", num_classes=1000).to(device)
    gen = torch.Generator(device).manual_seed(0)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, generator=gen, device=device)
    found_inf = torch.zeros((), device=device)
    hyper = dict(lr=0.3, momentum=0.9)

    def groups() -> list[dict]:
        return param_groups(model, weight_decay=1e-6, exclude_bias_norm=True)

    sslkit_lars = LARS(groups(), **hyper)
    amp_lars = LARS(groups(), **hyper)

    def amp_step() -> None:  # as under step_unless_found_inf or a GradScaler: skip decided on the device
        amp_lars.found_inf = found_inf
        amp_lars.step()
        del amp_lars.found_inf

    variants = {
        "lightly LARS": LightlyLARS(groups(), **hyper).step,
        "sslkit LARS": sslkit_lars.step,
        "sslkit LARS, found_inf": amp_step,
        "SGD foreach": torch.optim.SGD(groups(), **hyper, foreach=True).step,
        "SGD fused": torch.optim.SGD(groups(), **hyper, fused=True).step,
    }
    n_params = sum(1 for _ in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ResNet-50, {n_params} parameter tensors, torch {torch.__version__}, {name}")
    ms = {label: time_step(step, device, args.repeats, args.warmup) for label, step in variants.items()}
    for label, value in ms.items():
        print(f"{label:24s} {value:9.3f} ms/step")
    print(f"lightly LARS / sslkit LARS: {ms['lightly LARS'] / ms['sslkit LARS']:.2f}x")
    print(f"SGD foreach / SGD fused:    {ms['SGD foreach'] / ms['SGD fused']:.2f}x")


if __name__ == "__main__":
    main()
