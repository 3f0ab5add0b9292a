"""k-NN scoring time: sslkit's chunked FAISS search vs lightly's dense ``knn_predict``.

Both run in one process on the same random normalised features; medians of ``--repeats``.
Usage: ``python benchmarks/knn.py [--small] [--repeats 3] [--chunk-size 1024]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict

from sslkit.eval import knn_scores
from sslkit.eval.knn import DEFAULT_CHUNK


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="bank 6000 x 128, 1000 queries (seconds, for a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    n, q, d = (6000, 1000, 128) if args.small else (60000, 10000, 512)

    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1)  # (N, D)
    query = F.normalize(torch.randn(q, d, generator=g), dim=1)  # (Q, D)
    labels = torch.randint(0, args.classes, (n,), generator=g)  # (N,)
    bank_t = bank.T.contiguous()  # lightly's (D, N) layout, made outside the timing
    print(f"bank {n} x {d}, {q} queries, {args.classes} classes, {torch.get_num_threads()} threads, "
          f"chunk {args.chunk_size}, median of {args.repeats}")
    print(f"{'k':>4} {'T':>5} {'sslkit faiss s':>15} {'sslkit torch s':>15} {'lightly s':>10} {'lightly/faiss':>14}")
    for k, t in ((20, 0.07), (200, 0.1)):
        def ours(backend: str) -> float:
            return median_seconds(
                lambda: knn_scores(query, bank, labels, args.classes, k, t, args.chunk_size, backend), args.repeats
            )

        faiss_s, torch_s = ours("faiss"), ours("torch")
        ref = median_seconds(lambda: knn_predict(query, bank_t, labels, args.classes, k, t), args.repeats)
        print(f"{k:>4} {t:>5} {faiss_s:>15.2f} {torch_s:>15.2f} {ref:>10.2f} {ref / faiss_s:>14.2f}")


if __name__ == "__main__":
    main()
