"""Weighted k-NN classification of backbone features (DINO's / lightly's protocol).

Each query's k most cosine-similar bank features vote for their labels with weight
exp(sim / T); the class scores are the summed votes. The numbers match
``lightly.utils.benchmarking.knn_predict`` (which takes the bank as (D, N) and returns
only the class ranking), but the search never holds a full (Q, N) similarity matrix:
queries go through in chunks, and the search is FAISS's exact inner-product search.

Neighbour ties: when several bank features are exactly equally similar to a query, FAISS
(and the chunked torch search) may order them, and pick which of them make the k-th
place, differently from ``torch.topk`` on the full matrix, so scores can then differ from
lightly's. Continuous features practically never tie.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.eval.features import extract_features

if TYPE_CHECKING:
    import accelerate

# Queries per search call. On 2 shared CPU cores (60k x 512 bank) 1024 and 4096 ran equally
# fast when the machine was quiet, but under load FAISS's 2-thread OpenMP pays per call for
# every parallel region it opens: 4096 then ran 1.3-1.6x faster than 1024, and 256 2.5x slower.
DEFAULT_CHUNK = 4096

# Cap on one dense (rows, N) similarity block of the torch backend: 1 GiB of float32, so
# a million-image bank on a GPU does not exhaust its memory.
_SIM_ELEMENTS = 2**28

# (query chunk (c, D), k) -> (similarities (c, k), bank indices (c, k)), on the query's device
Search = Callable[[Tensor, int], tuple[Tensor, Tensor]]


def knn_scores(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = DEFAULT_CHUNK,
    backend: str = "auto",
) -> Tensor:
    """Summed exp(sim / T) votes of each query's k nearest bank features, per class.

    Args:
        query: (Q, D) features to classify; normalised here, any scale works.
        bank: (N, D) labelled features; normalised here.
        bank_labels: (N,) int labels in [0, num_classes).
        num_classes: C.
        k: neighbours per query (at most N are used).
        temperature: T of the vote weights exp(sim / T).
        chunk_size: queries searched at a time; memory is O(chunk_size * k) (the torch
            backend's (rows, N) similarity blocks are further capped at 1 GiB).
        backend: "faiss": exact inner-product search, a flat CPU index, or on CUDA tensors
            FAISS's GPU search when faiss has GPU support (there k <= 2048); "torch":
            chunked matmul + topk on the tensors' device; "auto": FAISS on the CPU and with
            faiss-gpu, torch on CUDA without it (a CPU index would copy the features off
            the GPU and be far slower than a GPU matmul).

    Returns:
        (Q, C) float32 scores on the query's device.
    """
    return knn_scores_multi(query, bank, bank_labels, num_classes, (k,), temperature, chunk_size, backend)[k]


def knn_scores_multi(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = DEFAULT_CHUNK,
    backend: str = "auto",
) -> dict[int, Tensor]:
    """:func:`knn_scores` for several k from one search with the largest k.

    The search returns each query's neighbours sorted by similarity, so the k nearest are
    a prefix of the max(ks) nearest; the votes are summed prefix by prefix, in increasing
    k, so the vote work is that of one k = max(ks) too. Memory: the len(ks) (Q, C) results
    plus O(chunk_size * max(ks)). Same arguments as :func:`knn_scores` except ``ks``, the
    neighbour counts (each at most N is used; on FAISS's GPU search max(ks) <= 2048).

    Returns:
        ``{k: (Q, C) float32 scores on the query's device}`` for every k in ``ks``.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"query (Q, D) and bank (N, D) must share D, got {tuple(query.shape)} and {tuple(bank.shape)}")
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} rows but bank_labels has {bank_labels.shape[0]}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty positive neighbour counts, got {tuple(ks)}")
    device = query.device
    query = F.normalize(query.float(), dim=1)  # (Q, D)
    bank = F.normalize(bank.float().to(device), dim=1)  # (N, D)
    bank_labels = bank_labels.to(device).long()  # (N,)
    order = sorted(set(ks))
    prefixes = [min(k, bank.shape[0]) for k in order]  # neighbours actually used per k, ascending
    scores = {k: torch.zeros(query.shape[0], num_classes, device=device) for k in order}  # (Q, C) each
    with searcher(bank, backend) as search:
        for start in range(0, query.shape[0], chunk_size):
            sims, idx = search(query[start : start + chunk_size], prefixes[-1])  # (c, kmax), (c, kmax)
            votes = (sims / temperature).exp()  # (c, kmax)
            nb_labels = bank_labels[idx]  # (c, kmax)
            rows = slice(start, start + idx.shape[0])
            done, previous = 0, None
            for k, used in zip(order, prefixes):
                block = scores[k][rows]  # (c, C) view
                if previous is not None:
                    block.copy_(previous)  # the votes of the shorter prefix, then the next neighbours'
                block.scatter_add_(1, nb_labels[:, done:used], votes[:, done:used])
                done, previous = used, block
    return scores


def knn_accuracy(scores: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fractions of queries whose label is among their ``t`` best-scored classes.

    A class without a single vote (score 0) never counts as predicted, so top-5 with
    fewer than 5 voted classes is not inflated by arbitrary tie order.

    Args:
        scores: (Q, C) class scores, e.g. from :func:`knn_scores`.
        labels: (Q,) true classes.
        topk: which ranks to report; ``t`` > C is treated as C.

    Returns:
        ``{"knn_top1": ..., "knn_top5": ...}`` (one key per ``t``), fractions in [0, 1].
    """
    correct = _topk_correct(scores, labels, topk)
    return {f"knn_top{t}": float(c) / max(labels.shape[0], 1) for t, c in zip(topk, correct.tolist())}


class KNNMonitor:
    """Training hook: k-NN accuracy of the current backbone, bank = clean train images.

    ``bank_batches`` and ``test_batches`` are iterated on every call, so they must be
    re-iterable (a loader object, not a generator). Under several processes each rank
    embeds its shards; the bank is gathered to every rank, each rank classifies only its
    own test shard, and the correct counts are summed across ranks: the search work is
    split P ways, and every rank returns the same numbers by construction.

    Reports ``knn_top{t}`` for ``k`` and each ``t`` in ``topk``, plus ``knn_top1_k{k'}``
    for every other ``k'`` in ``ks``, all from one search (:func:`knn_scores_multi`).
    """

    def __init__(
        self,
        bank_batches: Iterable[tuple[Tensor, Tensor]],
        test_batches: Iterable[tuple[Tensor, Tensor]],
        transform: Callable[[Tensor], Tensor],
        num_classes: int,
        k: int = 20,
        temperature: float = 0.07,
        topk: Sequence[int] = (1, 5),
        ks: Sequence[int] | None = None,
    ) -> None:
        self.bank_batches = bank_batches
        self.test_batches = test_batches
        self.transform = transform
        self.num_classes = num_classes
        self.k = k
        self.temperature = temperature
        self.topk = tuple(topk)
        # extra k values, reported as top-1 only; the main k is searched anyway
        self.extra_ks = tuple(dict.fromkeys(x for x in ks or () if x != k))

    def __call__(self, backbone: nn.Module, accelerator: "accelerate.Accelerator | None" = None) -> dict[str, float]:
        bank, bank_labels = extract_features(backbone, self.bank_batches, self.transform, accelerator)  # (N, D), (N,)
        test, test_labels = extract_features(
            backbone, self.test_batches, self.transform, accelerator, gather=False
        )  # (q, D), (q,): this rank's shard
        device = accelerator.device if accelerator is not None else torch.device("cpu")
        scores = knn_scores_multi(
            test.to(device), bank.to(device), bank_labels.to(device), self.num_classes, (self.k, *self.extra_ks),
            self.temperature,
        )  # {k: (q, C)}
        test_labels = test_labels.to(device)
        total = torch.tensor([test_labels.shape[0]], device=device)
        counts = torch.cat([
            _topk_correct(scores[self.k], test_labels, self.topk),
            *(_topk_correct(scores[k], test_labels, (1,)) for k in self.extra_ks),
            total,
        ])  # (len(topk) + len(extra_ks) + 1,)
        if accelerator is not None:
            counts = accelerator.reduce(counts, reduction="sum")
        counts = counts.tolist()
        names = [f"knn_top{t}" for t in self.topk] + [f"knn_top1_k{k}" for k in self.extra_ks]
        return {name: c / max(counts[-1], 1) for name, c in zip(names, counts[:-1])}


def _topk_correct(scores: Tensor, labels: Tensor, topk: Sequence[int]) -> Tensor:
    """(len(topk),) int64 counts of queries whose label is among their t best voted classes."""
    maxk = min(max(topk), scores.shape[1])
    best, pred = scores.topk(maxk, dim=1)  # (Q, maxk)
    hit = (pred == labels[:, None].to(pred.device)) & (best > 0)  # (Q, maxk)
    return torch.stack([hit[:, : min(t, maxk)].any(dim=1).sum() for t in topk])


@contextlib.contextmanager
def searcher(bank: Tensor, backend: str = "auto", index: "faiss.IndexFlatIP | None" = None) -> Iterator[Search]:
    """An exact inner-product k-NN search over the normalised (N, D) ``bank``: a function
    ``(queries (c, D), k) -> (similarities (c, k), bank indices (c, k))``, best first.

    ``backend`` picks FAISS's GPU search, a CPU ``IndexFlatIP`` or a chunked torch matmul, as
    :func:`knn_scores` describes. ``index``: an ``IndexFlatIP`` that already holds ``bank``,
    searched on the CPU path instead of building another copy (the GPU paths read ``bank``).
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"knn backend must be 'auto', 'faiss' or 'torch', got '{backend}'")
    on_cuda = bank.device.type == "cuda"
    faiss_gpu = on_cuda and hasattr(faiss, "StandardGpuResources")
    if backend == "torch" or (backend == "auto" and on_cuda and not faiss_gpu):
        yield _torch_search(bank)
    elif faiss_gpu:
        yield _faiss_gpu_search(bank)
    else:
        # FAISS uses every core by default; follow torch's thread count so several
        # processes on one machine do not oversubscribe it.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(torch.get_num_threads())
        try:
            if index is None:
                index = faiss.IndexFlatIP(bank.shape[1])
                index.add(bank.cpu().numpy())

            def search(q: Tensor, k: int) -> tuple[Tensor, Tensor]:
                sims, idx = index.search(np.ascontiguousarray(q.cpu().numpy()), k)
                return torch.from_numpy(sims).to(q.device), torch.from_numpy(idx).to(q.device)

            yield search
        finally:
            faiss.omp_set_num_threads(threads)


def _torch_search(bank: Tensor) -> Search:
    """Dense similarities in row blocks of at most _SIM_ELEMENTS, then topk."""
    rows = max(1, _SIM_ELEMENTS // bank.shape[0])

    def search(q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        parts = [(block @ bank.T).topk(k, dim=1) for block in q.split(rows)]  # (r, N) -> (r, k) each
        return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])

    return search


def _faiss_gpu_search(bank: Tensor) -> Search:
    """Brute-force inner-product search on the bank's GPU, reading the torch tensors in place."""
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take CUDA tensors)

    res = _gpu_resources()
    device = bank.device.index if bank.device.index is not None else torch.cuda.current_device()
    return lambda q, k: faiss.knn_gpu(res, q.contiguous(), bank, k, metric=faiss.METRIC_INNER_PRODUCT, device=device)


@functools.lru_cache(maxsize=None)
def _gpu_resources() -> "faiss.StandardGpuResources":
    # Allocating GPU scratch memory is slow; one resource object serves every call.
    return faiss.StandardGpuResources()
