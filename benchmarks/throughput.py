"""Training throughput: sslkit's full step against its compute bound and against lightly's pipeline.

Per setting, in one run on one machine (ratios only mean something within a run):

  (a) sslkit's full training step: ``sslkit.engine.train`` on device-resident synthetic uint8
      images (batched views, Accelerate, the non-finite guard, schedules, logging); img/s is the
      median of metrics.jsonl's ``img_per_s`` windows after the first (warm-up) one;
  (b) the compute bound: the same method, optimiser, precision and memory format on views
      made once on the device and reused; forward, backward, optimiser step in a plain loop;
  (c) lightly's pipeline: PIL images through lightly's transform in DataLoader workers,
      lightly's heads and loss, the same backbone, optimiser and batch (skipped without lightly;
      always eager: --compile compiles (a) and (b) only);
  augmentation alone: sslkit's batched views on the device against lightly's per-image
      transform, both in this one process.

Also the peak device memory of (a), (b), (c), and pass/fail lines against the targets.

    python benchmarks/throughput.py                          # GPU: the three full settings
    python benchmarks/throughput.py --compile --modes a,b    # with train.compile (and (b) compiled)
    python benchmarks/throughput.py --small                  # CPU-sized settings, under 2 minutes on 2 cores
    python benchmarks/throughput.py --small --settings resnet18 --steps 3 --windows 2
    python benchmarks/throughput.py --smoke --json /tmp/t.json   # seconds: checks that everything runs

Settings (``--settings``): resnet18 (ResNet-18, 32 px, batch 512, SimCLR), resnet50
(ResNet-50, 224 px from 256 px images, batch 128, SimCLR), dino (ViT-S/16, DINO multi-crop
2 x 224 + 10 x 96 px, batch 128); ``--small`` and ``--smoke`` shrink each to CPU size.
Each is built from its recipe (``RECIPES``) with overrides: synthetic data, no k-NN, no online
probe or collapse monitor (evaluation, which lightly's loop lacks), one checkpoint at the end,
bf16 autocast and channels_last on CUDA (full precision, contiguous on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

START = time.perf_counter()  # the wall time reported includes imports

import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from PIL import Image  # noqa: E402

from sslkit.augment import create_augment  # noqa: E402
from sslkit.config import Config, load_config  # noqa: E402
from sslkit.data import load_dataset  # noqa: E402
from sslkit.engine import read_metrics, train  # noqa: E402
from sslkit.engine.compile import compile_networks  # noqa: E402
from sslkit.engine.optim import create_optimizer, optim_schedules, set_schedules  # noqa: E402
from sslkit.schedules import at_step  # noqa: E402
from sslkit.methods import create_method  # noqa: E402

try:  # lightly's side lives in compare_lightly.py (this script's folder is on sys.path)
    import compare_lightly
except ImportError as err:  # lightly not installed: (c) is skipped
    compare_lightly = None
    LIGHTLY_MISSING = f"{type(err).__name__}: {err}"

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
MODES = ("aug", "a", "b", "c")
QUOTED_NO = "'no'"  # overrides are YAML, where a bare no is false


@dataclass(frozen=True)
class Setting:
    title: str
    recipe: str  # a file in recipes/
    source_size: int  # side of the synthetic images the views are cropped from
    batch: int
    window: int  # optimiser steps per timed window (the trainer's log_every_steps)
    windows: int  # timed windows after one warm-up window
    overrides: tuple[str, ...] = ()
    aug_batch: Optional[int] = None  # augmentation alone: sslkit's batch (None: the training batch)
    aug_images: int = 256  # augmentation alone: images per call of lightly's per-image transform


# A tiny DINO ViT for the CPU: vit_tiny, patch 8 (small) or 4 (smoke), a smaller head.
_TINY_VIT = ("model.backbone=vit_tiny_patch16_224", "method.proj_hidden_dim=512",
             "method.proj_output_dim=4096")
SETTINGS: dict[str, dict[str, Setting]] = {
    "full": {
        "resnet18": Setting("ResNet-18, 32 px, batch 512, SimCLR", "simclr_resnet18_cifar10.yaml",
                            32, 512, 20, 5),
        "resnet50": Setting("ResNet-50, 224 px, batch 128, SimCLR", "simclr_resnet50_imagenet.yaml",
                            256, 128, 10, 4, aug_images=64),
        "dino": Setting("ViT-S/16, DINO multi-crop 2x224 + 10x96 px, batch 128", "dino_vits16_imagenet.yaml",
                        256, 128, 10, 4, aug_images=32),
    },
    # 2 CPU cores: about 0.5 s per step each, so small batches and few steps; augmentation alone
    # (cheap) at a larger batch, where batching pays as it does at the GPU settings' batches
    "small": {
        "resnet18": Setting("ResNet-18, 32 px, batch 16, SimCLR", "simclr_resnet18_cifar10.yaml",
                            32, 16, 2, 3, aug_batch=256),
        "resnet50": Setting("ResNet-50, 64 px, batch 16, SimCLR", "simclr_resnet50_imagenet.yaml",
                            72, 16, 2, 3, ("augment.size=64",), aug_batch=64, aug_images=64),
        "dino": Setting("ViT-tiny/8, DINO multi-crop 2x32 + 10x16 px, batch 16", "dino_vits16_imagenet.yaml",
                        36, 16, 2, 3, (*_TINY_VIT, "model.timm_kwargs={dynamic_img_size: true, img_size: 32, "
                                       "patch_size: 8}", "augment.size=32", "augment.local_size=16"),
                        aug_batch=64, aug_images=64),
    },
    "smoke": {
        "resnet18": Setting("ResNet-18, 16 px, batch 8, SimCLR", "simclr_resnet18_cifar10.yaml",
                            16, 8, 1, 2, ("augment.size=16",), aug_images=8),
        "resnet50": Setting("ResNet-50, 32 px, batch 4, SimCLR", "simclr_resnet50_imagenet.yaml",
                            36, 4, 1, 2, ("augment.size=32",), aug_images=4),
        "dino": Setting("ViT-tiny/4, DINO multi-crop 2x16 + 10x8 px, batch 4", "dino_vits16_imagenet.yaml",
                        18, 4, 1, 2, (*_TINY_VIT, "model.timm_kwargs={dynamic_img_size: true, img_size: 16, "
                                      "patch_size: 4}", "augment.size=16", "augment.local_size=8"),
                        aug_images=4),
    },
}


@dataclass
class Measure:
    img_per_s: Optional[float] = None
    peak_gib: Optional[float] = None  # None on the CPU
    start_gib: Optional[float] = None  # allocated when the mode began (left over from earlier ones)
    seconds: Optional[float] = None  # the whole mode: setup, warm-up, timed windows, teardown
    error: Optional[str] = None
    details: dict[str, Any] = field(default_factory=dict)  # per-window numbers, what was compiled


# ---------------------------------------------------------------------------------------
# Shared helpers


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
    except OSError:
        models = []
    return f"{models[0] if models else platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """What Accelerate's mixed_precision does around the forward, for the plain loops (b) and (c)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def timed_windows(step: Callable[[int], None], window: int, windows: int, device: torch.device) -> list[float]:
    """Seconds of each of ``windows`` windows of ``window`` steps, after one warm-up window;
    each ends with a device synchronisation, as the trainer's windows end with a host read."""
    k = 0
    for _ in range(window):
        step(k)
        k += 1
    synchronize(device)
    seconds = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(window):
            step(k)
            k += 1
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def error_text(err: BaseException) -> str:
    return (f"{type(err).__name__}: {err}".splitlines() or [""])[0][:300]


def measured(device: torch.device, run: Callable[[], tuple[float, dict[str, Any]]]) -> Measure:
    """``run()`` -> (img/s, details), with the peak device memory around it; an error is recorded,
    not raised, so that one failing mode (e.g. a compile failure) leaves the others' numbers."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = Measure(start_gib=torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    start = time.perf_counter()
    try:
        result.img_per_s, result.details = run()
    except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
        traceback.print_exc()
        result.error = error_text(err)
    if device.type == "cuda":
        synchronize(device)
        result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    result.seconds = time.perf_counter() - start
    gc.collect()
    return result


def setting_config(setting: Setting, device: torch.device, compile_: bool, extra: list[str]) -> Config:
    """The recipe with the benchmark's overrides: synthetic images at the source size, one
    epoch per timed window, no evaluation, a checkpoint only at the end."""
    cuda = device.type == "cuda"
    epochs = 1 + setting.windows
    overrides = [
        "data.name=synthetic", f"data.image_size={setting.source_size}",
        f"data.train_limit={setting.batch * setting.window}",  # one epoch = one window
        f"train.batch_size={setting.batch}", f"train.epochs={epochs}", f"train.log_every_steps={setting.window}",
        f"train.checkpoint_every_epochs={epochs}", "train.progress=false", f"train.compile={str(compile_).lower()}",
        f"train.precision={'bf16' if cuda else QUOTED_NO}", f"model.channels_last={str(cuda).lower()}",
        "model.sync_batchnorm=false",  # one process: plain BatchNorm, as lightly's side
        "eval.knn=false", "eval.at_start=false", "eval.online_probe=false", "eval.collapse_every_steps=0",
        *setting.overrides, *extra,
    ]
    return load_config(RECIPES / setting.recipe, overrides)


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.model.channels_last else torch.contiguous_format


# ---------------------------------------------------------------------------------------
# The four measurements


def rate(setting: Setting, seconds: list[float]) -> tuple[float, dict[str, Any]]:
    """img/s from the median window, and each window's img/s."""
    per_window = [round(setting.batch * setting.window / s, 2) for s in seconds]
    return setting.batch * setting.window / statistics.median(seconds), {"window_img_per_s": per_window}


def run_sslkit(cfg: Config, setting: Setting, out_dir: str) -> tuple[float, dict[str, Any]]:
    """(a): the trainer itself; the median of its img/s windows after the first."""
    cfg.train.output_dir, cfg.train.name = out_dir, "sslkit"
    train(cfg)
    metrics = read_metrics(Path(out_dir) / "sslkit")
    windows = [m["img_per_s"] for m in metrics if "img_per_s" in m]
    if len(windows) < 2:
        raise RuntimeError(f"expected a warm-up window and timed ones in metrics.jsonl, got {windows}")
    start = next((m for m in metrics if m.get("event") == "start"), {})
    return statistics.median(windows[1:]), {"window_img_per_s": windows[1:], "warmup_img_per_s": windows[0],
                                            "compiled": start.get("compiled") if cfg.train.compile else None}


def run_compute_bound(cfg: Config, setting: Setting, images: torch.Tensor,
                      device: torch.device) -> tuple[float, dict[str, Any]]:
    """(b): the trainer's step without data or augmentation: views made once, reused every step."""
    set_seed(cfg.train.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    with torch.no_grad():
        views = [v.contiguous(memory_format=memory_format(cfg))
                 for v in create_augment(cfg.augment).to(device)(images[: setting.batch].to(device), generator)]
    method = create_method(cfg).to(device)
    optimizer = create_optimizer(method, cfg.optim, setting.batch)
    total = setting.window * (1 + setting.windows)
    schedules = {**optim_schedules(cfg.optim, setting.batch, setting.window, total),
                 **method.schedules(setting.window, total)}
    compiled = compile_networks(method.compile_targets(), device) if cfg.train.compile else None
    applied = torch.ones((), device=device)  # every step applies: no non-finite check in the bound

    def step(k: int) -> None:
        method.scheduled = at_step(schedules, k)
        set_schedules(optimizer, method.scheduled)
        with autocast(device, cfg.train.precision):
            loss = method(views)["loss"]
        loss.backward()
        if cfg.optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad_norm)
        method.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(applied)

    img_per_s, details = rate(setting, timed_windows(step, setting.window, setting.windows, device))
    return img_per_s, {**details, "compiled": compiled}


class Repeat(torch.utils.data.Dataset):
    """``dataset`` cycled to ``length`` items: every timed step has a batch, with few images in memory."""

    def __init__(self, dataset: torch.utils.data.Dataset, length: int) -> None:
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i % len(self.dataset)]


def run_lightly(cfg: Config, setting: Setting, images: torch.Tensor, device: torch.device,
                workers: int) -> tuple[float, dict[str, Any]]:
    """(c): lightly's way (compare_lightly's modules and transforms): PIL images in memory through
    its transform in DataLoader workers, its heads, loss and momentum updates, a plain loop with
    the recipe's optimiser and schedule. Gradient clipping where the recipe clips (sslkit does the
    same work); bf16 autocast and channels_last as (a)."""
    set_seed(cfg.train.seed)
    lightly_method = compare_lightly.LIGHTLY[cfg.method.name]
    total = setting.window * (1 + setting.windows)
    loader = torch.utils.data.DataLoader(
        Repeat(compare_lightly.PILViews(images, lightly_method.transform(cfg)), total * setting.batch),
        batch_size=setting.batch, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    model = lightly_method(cfg).to(device)
    optimizer = create_optimizer(model, cfg.optim, setting.batch)
    schedules = optim_schedules(cfg.optim, setting.batch, setting.window, total)
    batches = iter(loader)
    fmt = memory_format(cfg)

    def step(k: int) -> None:
        set_schedules(optimizer, at_step(schedules, k))
        views = [v.to(device, non_blocking=True).contiguous(memory_format=fmt) for v in next(batches)]
        with autocast(device, cfg.train.precision):
            loss = model.training_step(views, k, setting.window, total)
        loss.backward()
        if cfg.optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        model.before_optimizer_step(k // setting.window)  # an "epoch" is a window, as in (a)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_windows(step, setting.window, setting.windows, device)
    del batches  # stops the workers
    img_per_s, details = rate(setting, seconds)
    return img_per_s, {**details, "workers": workers}


def median_img_per_s(fn: Callable[[], None], images: int, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return images / statistics.median(seconds)


def run_augment(cfg: Config, setting: Setting, images: torch.Tensor, device: torch.device,
                repeats: int) -> dict[str, float]:
    """Augmentation alone, one process: sslkit's views of a batch on the device against lightly's
    transform of PIL images one at a time (what each DataLoader worker does)."""
    batch = images[: setting.aug_batch or setting.batch].to(device)
    augment = create_augment(cfg.augment).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    ours = median_img_per_s(lambda: augment(batch, generator), len(batch), repeats, device)
    result = {"sslkit_img_per_s": ours, "sslkit_batch": len(batch), "sslkit_threads": torch.get_num_threads()}
    if compare_lightly is not None:
        transform = compare_lightly.LIGHTLY[cfg.method.name].transform(cfg)
        pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images[: setting.aug_images]]
        result["lightly_img_per_s"] = median_img_per_s(lambda: [transform(p) for p in pil], len(pil), repeats,
                                                       torch.device("cpu"))
        result["lightly_images"] = len(pil)
        result["ratio"] = ours / result["lightly_img_per_s"]
    return result


# ---------------------------------------------------------------------------------------
# One setting, the targets, the report


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def run_setting(key: str, setting: Setting, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== {key}: {setting.title} ({setting.recipe}; {setting.window} steps x "
          f"(1 warm-up + {setting.windows} timed) windows)", flush=True)
    cfg = lambda: setting_config(setting, device, args.compile, args.overrides)  # noqa: E731 - fresh each mode
    # The same uint8 images (on the host) for augmentation alone, (b) and (c); (a) loads its own,
    # the first batch * window of the same kind
    data_cfg = cfg().data
    data_cfg.train_limit = max(setting.batch * setting.window, setting.aug_batch or 0, setting.aug_images)
    images = load_dataset(data_cfg, "train").images
    out: dict[str, Any] = {"title": setting.title, "recipe": setting.recipe, "batch": setting.batch,
                           "window": setting.window, "windows": setting.windows}
    start = time.perf_counter()
    if "aug" in args.modes:
        try:
            out["aug"] = {**run_augment(cfg(), setting, images, device, args.aug_repeats), "error": None}
        except Exception as err:  # noqa: BLE001 - reported, the other modes still run
            traceback.print_exc()
            out["aug"] = {"error": error_text(err)}
    if "a" in args.modes:
        with tempfile.TemporaryDirectory(prefix="sslkit-throughput-") as tmp:
            out["a"] = measured(device, lambda: run_sslkit(cfg(), setting, tmp)).__dict__
    if "b" in args.modes:
        out["b"] = measured(device, lambda: run_compute_bound(cfg(), setting, images, device)).__dict__
    if "c" in args.modes:
        if compare_lightly is None:
            print(f"(c) skipped: lightly is not importable ({LIGHTLY_MISSING})")
            out["c"] = Measure(error=f"skipped: {LIGHTLY_MISSING}").__dict__
        else:
            out["c"] = measured(device, lambda: run_lightly(
                cfg(), setting, images[: setting.batch * setting.window], device, args.workers)).__dict__
    get = lambda mode, k="img_per_s": out.get(mode, {}).get(k)  # noqa: E731
    out["a/b"] = ratio(get("a"), get("b"))
    out["a/c"] = ratio(get("a"), get("c"))
    out["seconds"] = time.perf_counter() - start
    print_setting(out)
    return out


def fmt(value: Optional[float], spec: str = ",.1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def print_setting(r: dict[str, Any]) -> None:
    names = {"a": "(a) sslkit full training step", "b": "(b) views already on the device",
             "c": "(c) lightly pipeline"}
    print(f"{'':34}{'img/s':>12}{'peak GiB':>10}{'mode s':>8}")
    for mode, name in names.items():
        if mode in r:
            m = r[mode]
            compiled = m["details"].get("compiled")
            note = f"  {m['error']}" if m["error"] else f"  compiled: {compiled}" if compiled is not None else ""
            print(f"{name:34}{fmt(m['img_per_s']):>12}{fmt(m['peak_gib'], '.2f', 'n/a'):>10}"
                  f"{fmt(m['seconds'], '.0f'):>8}{note}")
    if "aug" in r:
        a = r["aug"]
        print(f"augmentation alone, one process: sslkit {fmt(a.get('sslkit_img_per_s'), ',.0f')} img/s "
              f"(batch {a.get('sslkit_batch', '-')}, {a.get('sslkit_threads', '-')} threads), lightly "
              f"{fmt(a.get('lightly_img_per_s'), ',.0f')} img/s (per image): {fmt(a.get('ratio'), '.1f')}x"
              + (f"  {a['error']}" if a.get("error") else ""))
    print(f"a/b {fmt(r['a/b'], '.3f')}   a/c {fmt(r['a/c'], '.2f')}   ({r['seconds']:.0f} s)", flush=True)


def targets(results: dict[str, dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The issue's targets that apply on this device; a missing value fails its target."""
    rows: list[dict[str, Any]] = []

    def add(key: str, what: str, value: Optional[float], threshold: float, at_most: bool = False) -> None:
        ok = value is not None and (value <= threshold if at_most else value >= threshold)
        rows.append({"setting": key, "target": what, "value": value, "threshold": threshold, "pass": ok})

    for key, r in results.items():
        if device.type == "cuda":
            add(key, "a/b >= 0.9", r["a/b"], 0.9)
            if key in ("resnet18", "resnet50"):
                threshold = 3.0 if key == "resnet18" else 2.5
                add(key, f"a/c >= {threshold}", r["a/c"], threshold)
            mem_a, mem_c = r.get("a", {}).get("peak_gib"), r.get("c", {}).get("peak_gib")
            add(key, "peak memory a/c <= 1", ratio(mem_a, mem_c), 1.0, at_most=True)
        else:
            add(key, "augmentation sslkit/lightly >= 10", r.get("aug", {}).get("ratio"), 10.0)
            add(key, "a/c >= 1", r["a/c"], 1.0)
    return rows


def print_summary(results: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    print(f"\n{'setting':10}{'a img/s':>11}{'b img/s':>11}{'c img/s':>11}{'a/b':>7}{'a/c':>7}"
          f"{'aug x':>8}{'mem a':>8}{'mem b':>8}{'mem c':>8}")
    for key, r in results.items():
        v = lambda mode, k="img_per_s": r.get(mode, {}).get(k)  # noqa: E731
        print(f"{key:10}{fmt(v('a')):>11}{fmt(v('b')):>11}{fmt(v('c')):>11}{fmt(r['a/b'], '.3f'):>7}"
              f"{fmt(r['a/c'], '.2f'):>7}{fmt(v('aug', 'ratio'), '.1f'):>8}"
              + "".join(f"{fmt(v(m, 'peak_gib'), '.2f', 'n/a'):>8}" for m in "abc"))
    for row in rows:
        print(f"{'PASS' if row['pass'] else 'FAIL'}  {row['setting']:10} {row['target']:36} "
              f"{fmt(row['value'], '.3f')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="CPU-sized settings (under 2 minutes on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny settings, 1-step windows: that it all runs")
    parser.add_argument("--settings", default="all", help="comma-separated subset of resnet18,resnet50,dino")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of aug,a,b,c")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed window (default: per setting)")
    parser.add_argument("--windows", type=int, default=None, help="timed windows after the warm-up one")
    parser.add_argument("--compile", action="store_true", help="train.compile=true for (a); (b) torch.compiled")
    parser.add_argument("--workers", type=int, default=None,
                        help="lightly's DataLoader workers (default: all cores but the main process's one; "
                             "0 with --smoke)")
    parser.add_argument("--aug-repeats", type=int, default=3, help="timed calls per augmentation measurement")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("overrides", nargs="*", help="more key=value config overrides for every setting")
    args = parser.parse_args()

    mode = "smoke" if args.smoke else "small" if args.small else "full"
    table = SETTINGS[mode]
    keys = list(table) if args.settings == "all" else [k.strip() for k in args.settings.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",")]
    for name, chosen, valid in (("setting", keys, table), ("mode", args.modes, MODES)):
        if unknown := [k for k in chosen if k not in valid]:
            parser.error(f"unknown {name} {', '.join(unknown)} (have: {', '.join(valid)})")
    if args.workers is None:
        args.workers = 0 if args.smoke else max(0, (os.cpu_count() or 1) - 1)
    settings = {}
    for key in keys:
        s = table[key]
        settings[key] = Setting(**{**s.__dict__, "window": args.steps or s.window,
                                   "windows": args.windows or s.windows})

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"mode {mode}{', compile' if args.compile else ''}; lightly DataLoader workers: {args.workers}"
          + ("" if compare_lightly is not None else "; lightly missing, (c) skipped"), flush=True)
    results: dict[str, dict[str, Any]] = {}

    def write_json(done: bool) -> None:
        """After every setting, so that a run stopped by a time limit still leaves its numbers."""
        if args.json:
            report = {"device": name, "device_type": device.type, "torch": torch.__version__,
                      "python": sys.version.split()[0], "threads": torch.get_num_threads(), "mode": mode,
                      "compile": args.compile, "workers": args.workers, "modes": args.modes,
                      "overrides": args.overrides, "complete": done, "wall_s": time.perf_counter() - START,
                      "settings": results, "targets": rows if done else targets(results, device)}
            Path(args.json).write_text(json.dumps(report, indent=2))

    for key, s in settings.items():
        results[key] = run_setting(key, s, device, args)
        write_json(done=False)
    rows = targets(results, device)
    wall = time.perf_counter() - START
    if mode == "small" and device.type == "cpu":
        rows.append({"setting": "all", "target": "small mode wall time < 120 s", "value": wall,
                     "threshold": 120.0, "pass": wall < 120.0})
    print_summary(results, rows)
    print(f"device: {name}; torch {torch.__version__}; wall time {wall:.1f} s"
          + (" (target: under 120 s on a 2-core CPU)" if mode == "small" else ""), flush=True)
    write_json(done=True)


if __name__ == "__main__":
    main()
