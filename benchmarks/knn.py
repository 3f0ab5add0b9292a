"""k-NN scoring time: sslkit's chunked search vs lightly's dense ``knn_predict``, and several k in one search.

Both run in one process on the same random normalised features; medians of ``--repeats``.
lightly holds the full (Q, N) float32 similarity matrix; above ``--max-dense-gib`` it is
skipped and the memory it would need is printed instead.
Usage: ``python benchmarks/knn.py [--small | --large | --huge] [--repeats 3] [--chunk-size 4096]
[--backends faiss,torch]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict

from sslkit.eval import knn_scores, knn_scores_multi
from sslkit.eval.knn import DEFAULT_CHUNK

MULTI_KS = (10, 20, 100, 200)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="bank 6000 x 128, 1000 queries (seconds, for a smoke run)")
    size.add_argument("--large", action="store_true",
                      help="bank 300000 x 512, 10000 queries (~3 GiB for sslkit; lightly's matrix would be 11 GiB)")
    size.add_argument("--huge", action="store_true",
                      help="bank 1000000 x 128, 10000 queries (0.5 GiB for sslkit; lightly's matrix would be 37 GiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--backends", default="faiss,torch", help="sslkit backends to time, comma-separated")
    parser.add_argument("--max-dense-gib", type=float, default=8.0, help="skip lightly above this (Q, N) matrix size")
    args = parser.parse_args()
    sizes = {"small": (6000, 1000, 128), "large": (300_000, 10_000, 512), "huge": (1_000_000, 10_000, 128)}
    n, q, d = next((v for k, v in sizes.items() if getattr(args, k)), (60000, 10000, 512))
    backends = args.backends.split(",")

    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1)  # (N, D)
    query = F.normalize(torch.randn(q, d, generator=g), dim=1)  # (Q, D)
    labels = torch.randint(0, args.classes, (n,), generator=g)  # (N,)
    dense_gib = q * n * 4 / 2**30  # lightly's (Q, N) float32 similarities
    run_lightly = dense_gib <= args.max_dense_gib
    bank_t = bank.T.contiguous() if run_lightly else None  # lightly's (D, N) layout, made outside the timing
    print(f"bank {n} x {d}, {q} queries, {args.classes} classes, {torch.get_num_threads()} threads, "
          f"chunk {args.chunk_size}, median of {args.repeats}")

    def ours(fn: Callable[..., object], backend: str, k: object, t: float) -> float:
        return median_seconds(
            lambda: fn(query, bank, labels, args.classes, k, t, args.chunk_size, backend), args.repeats
        )

    lightly_head = f" {'lightly s':>10} {'lightly/' + backends[0]:>14}" if run_lightly else ""
    print(f"{'k':>4} {'T':>5} " + " ".join(f"{'sslkit ' + b + ' s':>15}" for b in backends) + lightly_head)
    for k, t in ((20, 0.07), (200, 0.1)):
        times = [ours(knn_scores, b, k, t) for b in backends]
        row = f"{k:>4} {t:>5} " + " ".join(f"{s:>15.2f}" for s in times)
        if run_lightly:
            ref = median_seconds(lambda: knn_predict(query, bank_t, labels, args.classes, k, t), args.repeats)
            print(f"{row} {ref:>10.2f} {ref / times[0]:>14.2f}")
        else:
            print(f"{row}  lightly skipped: would need {dense_gib:.3g} GiB for its (Q, N) matrix")

    print(f"\nk = {', '.join(map(str, MULTI_KS))}, T 0.07: one search with max k vs one search per k")
    print(f"{'backend':>8} {'multi s':>8} {'separate s':>11} {'separate/multi':>15}")
    for b in backends:
        multi = ours(knn_scores_multi, b, MULTI_KS, 0.07)
        separate = median_seconds(
            lambda: [knn_scores(query, bank, labels, args.classes, k, 0.07, args.chunk_size, b) for k in MULTI_KS],
            args.repeats,
        )
        print(f"{b:>8} {multi:>8.2f} {separate:>11.2f} {separate / multi:>15.2f}")


if __name__ == "__main__":
    main()
