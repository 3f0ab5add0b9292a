"""Multi-view memory: DINO's views from one float source against views from V staged copies.

The views of the DINO ViT-S/16 recipe (``recipes/dino_vits16_imagenet.yaml``: multicrop preset,
2 global 224 px views of scale 0.4-1 and 10 local 96 px views of scale 0.05-0.4) of one
process's batch, 128 uint8 images of 256 x 256 x 3 (the recipe's 1024 over 8 GPUs, at
``data.image_size`` 256), on the CPU, made two ways in one run:

  before (staging): how ``ViewPipeline.several`` made a group's V views until this benchmark's
      commit, reproduced here (``staged_views``): the uint8 batch repeated V times
      (``repeat_interleave``) and converted to float32, then one crop per row;
  after (one source): ``sslkit.augment`` as it is: the batch converted to float32 once, each
      group's V crops sampled from it in one ``grid_sample``.

Peak memory: each way runs in a fresh subprocess, which resets its peak resident set size
(``VmHWM``, through ``/proc/self/clear_refs``) after its setup and reports the peak over the
timed calls less the resident size before them. torch's CPU allocator caches nothing (a freed
tensor goes back to malloc, and glibc unmaps blocks this large at once), so that is the memory
the calls' tensors needed, the views they return included; tracemalloc does not see torch's
allocations. Speed: median img/s of ``--repeats`` calls after a warm-up on 2 images (a subprocess
times its own calls: importing ``throughput.py``, which holds ``median_img_per_s``, would cost
it the trainer's and lightly's imports). Both ways are also checked to make the same views on
8 images with the same generator.

    python benchmarks/multiview_memory.py                    # the recipe's sizes: 1-2 minutes on 2 idle cores
    python benchmarks/multiview_memory.py --json /tmp/m.json --repeats 5
    python benchmarks/multiview_memory.py --smoke            # tiny sizes: that it all runs
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

START = time.perf_counter()  # the wall time reported includes imports

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from sslkit.augment import MultiView, ViewPipeline, create_augment, ops  # noqa: E402
from sslkit.augment.views import _coin, _jitter_factor, _per_view, _uniform  # noqa: E402
from sslkit.config import AugmentConfig, load_config  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "dino_vits16_imagenet.yaml"
WAYS = {"before": "before (staging)", "after": "after (one source)"}


@dataclass(frozen=True)
class Size:
    batch: int  # images per process
    source: int  # side of the uint8 source images
    overrides: tuple[str, ...] = ()  # on top of the recipe
    check_batch: int = 8  # images of the before/after equality check


SIZES = {
    "full": Size(128, 256),
    "smoke": Size(4, 36, ("augment.size=32", "augment.local_size=16"), check_batch=4),
}


# ---------------------------------------------------------------------------------------
# The old way, as sslkit/augment/views.py had it (ViewPipeline.several and _color_jitter)


def staged_several(
    pipeline: ViewPipeline, images: Tensor, probs: Sequence[tuple[float, float]],
    generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1),
) -> list[Tensor]:
    """The staging ``several``: images uint8 (B, C, H, W) repeated image-major to (B * V, C, H, W),
    converted to float, one crop per row; V float32 (B, 3, S, S), equal to ``pipeline.several``'s."""
    cfg = pipeline.cfg
    views = len(probs)
    if views > 1:
        images = images.repeat_interleave(views, 0)  # (B * V, C, H, W)
    batch, channels, height, width = images.shape
    device = images.device
    rank, world_size = shard
    n, rows = batch * world_size, slice(rank * batch, (rank + 1) * batch)  # draws, and ours
    blur_prob, solarize_prob = (_per_view(p, n, views, device) for p in zip(*probs))  # (n,) or float each

    boxes = ops.sample_crop_boxes(n, height, width, cfg.scale, cfg.ratio, generator, device)[rows]
    flip = _coin(n, cfg.hflip_prob, generator, device)[rows]
    x = ops.resized_crop_flip(images.float(), boxes, flip, cfg.size)  # (B * V, C, S, S) in [0, 255]
    x = x.expand(-1, 3, -1, -1)  # (B * V, 3, S, S), a view for C = 1

    if cfg.jitter_prob > 0:
        x = staged_color_jitter(pipeline, x, generator, n, rows)  # (B * V, 3, S, S) in [0, 1]
    else:
        x = x / 255
    if cfg.gray_prob > 0:
        x = ops.random_grayscale(x, _coin(n, cfg.gray_prob, generator, device)[rows])
    if any(p > 0 for p, _ in probs):
        blur = _coin(n, blur_prob, generator, device)[rows]
        sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], generator, device)[rows]
        x = ops.gaussian_blur(x, sigma, pipeline.blur_kernel, blur)
    if any(p > 0 for _, p in probs):
        x = ops.solarize(x, 0.5, _coin(n, solarize_prob, generator, device)[rows])
    if pipeline.normalize:
        x = ops.normalize(x, cfg.mean, cfg.std)
    return list(x.unflatten(0, (-1, views)).unbind(1)) if views > 1 else [x]


def staged_color_jitter(pipeline: ViewPipeline, x: Tensor, generator: torch.Generator | None, n: int,
                        rows: slice) -> Tensor:
    """x: (B, 3, S, S) in [0, 255] -> jittered, in [0, 1]; factors drawn for n samples, ``rows`` used."""
    cfg = pipeline.cfg
    jitter = _coin(n, cfg.jitter_prob, generator, x.device)
    brightness = _jitter_factor(jitter, cfg.brightness, generator)[rows]
    x = ops.adjust_brightness(x, brightness / 255)
    if cfg.contrast > 0:
        x = ops.adjust_contrast(x, _jitter_factor(jitter, cfg.contrast, generator)[rows])
    if cfg.saturation > 0:
        x = ops.adjust_saturation(x, _jitter_factor(jitter, cfg.saturation, generator)[rows])
    if cfg.hue > 0:
        x = ops.adjust_hue(x, _jitter_factor(jitter, cfg.hue, generator, centre=0.0)[rows])
    return x


def staged_views(views: MultiView, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
    """``views(images, generator)`` the old way: each group of views from its own staged copies."""
    out: list[Tensor] = []
    for run in views.runs:
        out += staged_several(run[0], images, [(p.cfg.blur_prob, p.cfg.solarize_prob) for p in run], generator)
    return out


# ---------------------------------------------------------------------------------------
# Measurements


def recipe_views(size: Size) -> tuple[AugmentConfig, MultiView]:
    cfg = load_config(RECIPE, list(size.overrides)).augment
    return cfg, create_augment(cfg)


def way_fn(way: str, views: MultiView) -> Callable[[Tensor, torch.Generator], list[Tensor]]:
    return views if way == "after" else lambda images, generator: staged_views(views, images, generator)


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


def measure(way: str, size: Size, repeats: int) -> dict[str, Any]:
    """In a fresh process: peak memory of ``repeats`` calls after a warm-up (MiB above the
    resident size before them) and their median img/s."""
    _, views = recipe_views(size)
    fn = way_fn(way, views)
    images = torch.randint(0, 256, (size.batch, 3, size.source, size.source), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    fn(images[:2], generator)  # warm-up (thread pools, cached constants) on a slice: a full call takes seconds
    rss_before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)
        reset = True
    except OSError:  # then VmHWM also covers the setup, whose peak stays below the calls'
        reset = False
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images, generator)
        seconds.append(time.perf_counter() - start)
    return {"peak_mib": (_status_kib("VmHWM") - rss_before) / 1024, "rss_before_mib": rss_before / 1024,
            "img_per_s": size.batch / statistics.median(seconds), "seconds": seconds, "hwm_reset": reset}


def measure_in_subprocess(way: str, mode: str, repeats: int) -> dict[str, Any]:
    """``measure(way, ...)`` in a fresh Python process: nothing this one allocated counts."""
    argv = [sys.executable, __file__, "--repeats", str(repeats), "--child", way]
    argv += ["--smoke"] if mode == "smoke" else []
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{way}: the measuring process failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def max_difference(size: Size) -> float:
    """max |after - before| over every view of ``size.check_batch`` images, same generator seed."""
    _, views = recipe_views(size)
    images = torch.randint(0, 256, (size.check_batch, 3, size.source, size.source), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    after = views(images, torch.Generator().manual_seed(2))
    before = staged_views(views, images, torch.Generator().manual_seed(2))
    assert [v.shape for v in after] == [v.shape for v in before]
    return max((a - b).abs().max().item() for a, b in zip(after, before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: that it all runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per way (after a warm-up on 2 images)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--child", choices=list(WAYS), help=argparse.SUPPRESS)  # measure one way, print JSON
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "full"
    size = SIZES[mode]
    if args.child:
        print(json.dumps(measure(args.child, size, args.repeats)))
        return

    cfg, views = recipe_views(size)
    sizes = [p.cfg.size for p in views.pipelines]
    view_mib = sum(size.batch * 3 * s * s * 4 for s in sizes) / 2**20
    print(f"DINO ViT-S/16 recipe's views ({RECIPE.name}): {sizes.count(cfg.size)} x {cfg.size} px + "
          f"{sizes.count(cfg.local_size)} x {cfg.local_size} px of {size.batch} uint8 images of "
          f"{size.source} x {size.source} x 3 ({view_mib:,.1f} MiB of float32 views); CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats}", flush=True)
    difference = max_difference(size)
    results = {way: measure_in_subprocess(way, mode, args.repeats) for way in WAYS}
    before, after = results["before"], results["after"]
    # None where nothing new was resident (tiny --smoke batches can reuse the warm-up's pages)
    peak_ratio = before["peak_mib"] / after["peak_mib"] if after["peak_mib"] > 0 else None
    speed_ratio = after["img_per_s"] / before["img_per_s"]

    print(f"{'way':<22}{'peak MiB':>12}{'img/s':>10}")
    for way, label in WAYS.items():
        print(f"{label:<22}{results[way]['peak_mib']:>12,.1f}{results[way]['img_per_s']:>10,.1f}")
    peak_text = "-" if peak_ratio is None else f"{peak_ratio:.2f}x"
    print(f"{'before / after':<22}{peak_text:>12}{1 / speed_ratio:>9.2f}x")
    print(f"after: peak memory {peak_text} lower, {speed_ratio:.2f}x the img/s; same views: "
          f"max |after - before| = {difference:.1e} ({size.check_batch} images)")
    wall = time.perf_counter() - START
    print(f"wall time {wall:.1f} s", flush=True)
    if args.json:
        report = {"mode": mode, "recipe": RECIPE.name, "batch": size.batch, "source_size": size.source,
                  "view_sizes": sizes, "view_mib": view_mib, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "repeats": args.repeats, **results, "peak_ratio": peak_ratio,
                  "speed_ratio": speed_ratio, "max_abs_difference": difference, "wall_s": wall}
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
