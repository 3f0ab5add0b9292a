"""benchmarks/throughput.py end to end, at its ``--smoke`` size (tiny models, 1-step windows).

It runs as a user runs it, in its own process, and must report every measurement of every
setting: (a) sslkit's trainer, (b) the compute bound, (c) lightly's pipeline (lightly is a
dependency, so (c) is never skipped here), augmentation alone, and the ratios between them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("resnet18", "resnet50", "dino")

pytestmark = pytest.mark.slow


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_throughput_smoke_reports_every_measurement(tmp_path: Path) -> None:
    report_path = tmp_path / "throughput.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--json", str(report_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["complete"] and report["mode"] == "smoke" and report["device_type"] in ("cpu", "cuda")
    assert list(report["settings"]) == list(SETTINGS)
    for key, r in report["settings"].items():
        for mode in "abc":
            assert r[mode]["error"] is None, (key, mode, r[mode]["error"])
            assert positive(r[mode]["img_per_s"]), (key, mode, r[mode])
        for name in ("a/b", "a/c"):
            assert positive(r[name]), (key, name, r[name])
        aug = r["aug"]
        assert aug["error"] is None and all(positive(aug[k]) for k in ("sslkit_img_per_s", "lightly_img_per_s",
                                                                         "ratio")), (key, aug)
    # The printed summary has a row per setting with the three rates and both ratios, and the
    # target lines of this device.
    rows = {cells[0]: cells for cells in map(str.split, proc.stdout.splitlines()) if cells and cells[0] in SETTINGS}
    assert set(rows) == set(SETTINGS), proc.stdout
    for key, cells in rows.items():
        assert all(positive(float(c.replace(",", ""))) for c in cells[1:6]), cells
    # The targets of this device, each read from its setting's measurement, its verdict recomputed
    # here and printed as such. A FAIL is allowed: smoke sizes (1-step windows, tiny models) are
    # not what the targets judge; a verdict computed, printed or attached to a value wrongly fails.
    targets = report["targets"]
    for key, r in report["settings"].items():
        if report["device_type"] == "cuda":
            measured = {"a/b >= 0.9": r["a/b"],
                        "peak memory a/c <= 1": ratio(r["a"].get("peak_gib"), r["c"].get("peak_gib"))}
            if key != "dino":
                measured[f"a/c >= {3.0 if key == 'resnet18' else 2.5}"] = r["a/c"]
        else:
            measured = {"augmentation sslkit/lightly >= 10": r["aug"]["ratio"], "a/c >= 1": r["a/c"]}
        assert {t["target"]: t["value"] for t in targets if t["setting"] == key} == measured
    for t in targets:
        value, threshold = t["value"], t["threshold"]
        assert t["pass"] == (value is not None and (value <= threshold if "<=" in t["target"] else value >= threshold))
    verdicts = [line.split()[:2] for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert verdicts == [["PASS" if t["pass"] else "FAIL", t["setting"]] for t in targets]
    assert "wall time" in proc.stdout and report["torch"] in proc.stdout


def test_multiview_memory_smoke_reports_both_ways(tmp_path: Path) -> None:
    """benchmarks/multiview_memory.py at its ``--smoke`` size: both ways measured (each in its
    own process), their ratios, and the same views from both."""
    report_path = tmp_path / "multiview.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "multiview_memory.py"), "--smoke", "--repeats", "1",
         "--json", str(report_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["mode"] == "smoke" and report["view_sizes"] == [32, 32] + [16] * 10
    for way in ("before", "after"):
        assert positive(report[way]["img_per_s"]) and report[way]["peak_mib"] >= 0, report[way]
    assert report["peak_ratio"] is None or positive(report["peak_ratio"])  # None: no new pages after
    assert positive(report["speed_ratio"])
    assert report["max_abs_difference"] == 0.0
    lines = proc.stdout.splitlines()
    assert any(line.startswith("before (staging)") for line in lines), proc.stdout
    assert any(line.startswith("after (one source)") for line in lines), proc.stdout


def test_loader_benchmark_reports_every_pipeline(tmp_path: Path) -> None:
    """benchmarks/loader.py at a few images: every pipeline measured, the shard index too."""
    report_path = tmp_path / "loader.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loader.py"), "--images", "16", "--size", "32", "--repeats", "1",
         "--json", str(report_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    pipelines = {"torchvision", "sslkit_folder", "sslkit_shards", "lightly"}
    assert set(report["img_per_s_per_worker"]) == set(report["img_per_cpu_s_per_worker"]) == pipelines
    assert all(positive(v) for v in [*report["img_per_s_per_worker"].values(),
                                     *report["img_per_cpu_s_per_worker"].values()])
    assert positive(report["shard_index_us_per_sample"]) and positive(report["speedup_folder_cpu"])
