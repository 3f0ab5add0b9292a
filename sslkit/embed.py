"""``sslkit embed``: a checkpoint's features of every image of a dataset, a FAISS index over them,
and, on request, each image's nearest neighbours and the near-duplicate pairs.

    sslkit embed --checkpoint runs/dino/backbone.safetensors --data image_folder --data-root photos/ \\
        data.image_size=224 --out photos_emb/ --neighbors 10 --duplicates 0.95

Files in ``--out``; every one reads with numpy, faiss and the standard library alone:

* ``embeddings.npy``: ``(N, D)`` float32, row i the feature of item i, **L2-normalised**, so an
  inner product is a cosine similarity (a zero feature stays zero).
* ``items.txt``: N lines, the file path or sample key of each row
  (``sslkit.data.item_keys``: an image folder's paths; ``fashion_mnist/train/000123`` for
  in-memory datasets).
* ``index.faiss``: a ``faiss.IndexFlatIP`` holding the rows in order (exact cosine search):
  ``faiss.read_index(path).search(normalised_queries, k)``.
* ``neighbors.jsonl`` (``--neighbors K``): per row, in order,
  ``{"row": i, "item": ..., "neighbors": [{"row": j, "item": ..., "similarity": s}, ...]}``, its K
  most similar other rows, most similar first (itself excluded, even when exact duplicates tie
  with it).
* ``duplicates.jsonl`` (``--duplicates T``): one line per pair with cosine similarity >= T, each
  pair once (i < j), ordered by i then j:
  ``{"rows": [i, j], "items": [..., ...], "similarity": s}``.
* ``embed.json``: what was embedded (checkpoint, data, split, N, D), the counts, and the files
  left out: under ``data.bad_images=skip`` an undecodable file is named in a warning and has no
  row (the loader fills its place with the next image, which would otherwise pass for its
  duplicate).

Memory is bounded: images are embedded batch by batch straight into ``embeddings.npy`` (a
memory map); neighbours are searched ``chunk_size`` queries at a time, and duplicates are found
in blocks of at most ``chunk_size`` rows x N similarities (capped at 64 Mi elements), so no N x N
matrix is ever made. The features themselves (N x D) are held once for the search: in the FAISS
index on the CPU, on the GPU there. The neighbour search is ``sslkit.eval.knn.searcher``, the
k-NN monitor's: FAISS's GPU search when the features are on CUDA and faiss has GPU support, a
chunked torch matmul on CUDA without it, a CPU ``IndexFlatIP`` otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from sslkit.data import Batches
from sslkit.errors import UserError
from sslkit.eval.features import iter_features
from sslkit.eval.knn import DEFAULT_CHUNK, searcher

FILES = ("embeddings.npy", "items.txt", "index.faiss")
NEIGHBORS = "neighbors.jsonl"
DUPLICATES = "duplicates.jsonl"
SUMMARY = "embed.json"

# Cap on one (rows, N) similarity block of the duplicate scan: 256 MiB of float32.
_BLOCK_ELEMENTS = 2**26


def check_embed_options(neighbors: Optional[int], duplicates: Optional[float]) -> None:
    """One-line errors for ``--neighbors`` and ``--duplicates`` values that cannot work."""
    if neighbors is not None and neighbors < 1:
        raise UserError(f"--neighbors must be at least 1 (the neighbours listed per item), got {neighbors}")
    if duplicates is not None and not -1.0 <= duplicates <= 1.0:
        raise UserError(
            f"--duplicates is a cosine similarity threshold in [-1, 1] (e.g. 0.95 for near-duplicates), "
            f"got {duplicates:g}"
        )


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    """A tqdm bar counting images, shown by the main process (``sslkit embed`` runs as one)."""
    return tqdm(total=total, unit="img", unit_scale=True, dynamic_ncols=True, desc=desc, disable=not progress)


def write_embeddings(
    model: nn.Module,
    batches: Any,
    transform: Callable[[Tensor], Tensor],
    accelerator: Accelerator,
    num_items: int,
    path: Path,
    progress: bool = True,
) -> np.memmap:
    """Embed every batch into ``path`` (an ``.npy`` memory map), L2-normalised; returns it (N, D).

    ``batches`` yields the N items in index order (one process); the tqdm bar counts images.
    """
    bar = _bar(num_items, "embed", progress and accelerator.is_main_process)
    out: Optional[np.memmap] = None
    row = 0
    with bar:
        for features, _ in iter_features(model, batches, transform, accelerator):
            features = F.normalize(features, dim=1)  # (b, D)
            if out is None:
                out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_items, features.shape[1]))
            if row + len(features) > num_items:
                raise RuntimeError(f"the batches hold more than the dataset's {num_items} items")
            out[row : row + len(features)] = features.cpu().numpy()
            row += len(features)
            bar.update(len(features))
    if out is None or row != num_items:
        raise RuntimeError(f"embedded {row} items, but the dataset has {num_items}")
    out.flush()
    return out


def _keep_rows(embeddings: np.memmap, keep: np.ndarray, path: Path, chunk_size: int) -> np.memmap:
    """``embeddings[keep]`` written over ``path`` (its memory map), ``chunk_size`` rows at a time."""
    tmp = path.with_name(f".{path.name}.tmp")
    kept = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(int(keep.sum()), embeddings.shape[1]))
    row = 0
    for start in range(0, len(embeddings), chunk_size):
        part = embeddings[start : start + chunk_size][keep[start : start + chunk_size]]  # (c', D)
        kept[row : row + len(part)] = part
        row += len(part)
    kept.flush()
    os.replace(tmp, path)
    return kept


def flat_index(embeddings: np.ndarray, chunk_size: int = DEFAULT_CHUNK) -> faiss.IndexFlatIP:
    """A ``faiss.IndexFlatIP`` holding the (N, D) rows in order, added ``chunk_size`` at a time."""
    index = faiss.IndexFlatIP(embeddings.shape[1])
    for start in range(0, len(embeddings), chunk_size):
        index.add(np.ascontiguousarray(embeddings[start : start + chunk_size], dtype=np.float32))
    return index


def nearest_neighbors(
    embeddings: Tensor, k: int, chunk_size: int = DEFAULT_CHUNK, index: Optional[faiss.IndexFlatIP] = None,
    backend: str = "auto",
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Each row's ``k`` most similar other rows (at most N - 1), most similar first.

    Args:
        embeddings: (N, D) L2-normalised features, on the device to search on.
        k: neighbours per row.
        chunk_size: query rows per search call.
        index: an ``IndexFlatIP`` already holding ``embeddings`` (saves a copy on the CPU).
        backend: ``sslkit.eval.knn.searcher``'s: "auto" (FAISS, GPU or CPU as the features
            are, or a torch matmul on CUDA without faiss-gpu), "faiss" or "torch".

    Yields:
        ``(start, similarities (c, k'), rows (c, k'))`` per chunk of rows ``start .. start + c``,
        k' = min(k, N - 1). A row is left out of its own list even when exact duplicates tie
        with it (the search asks for k' + 1 and drops the row itself, or the last when the
        row is not among them).
    """
    n = embeddings.shape[0]
    k = min(k, n - 1)
    with searcher(embeddings, backend, index) as search:
        for start in range(0, n, chunk_size):
            query = embeddings[start : start + chunk_size]  # (c, D)
            if k == 0:
                empty = torch.empty(len(query), 0)
                yield start, empty, empty.long()
                continue
            sims, idx = search(query, k + 1)  # (c, k + 1) each
            rows = torch.arange(start, start + len(query), device=idx.device)  # (c,)
            drop = idx == rows[:, None]  # (c, k + 1): the row itself
            drop[~drop.any(dim=1), -1] = True  # not found (ties beyond k + 1): drop the farthest
            keep = ~drop
            yield start, sims[keep].view(-1, k), idx[keep].view(-1, k)


def duplicate_pairs(
    embeddings: Tensor, threshold: float, chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The pairs of rows i < j whose inner product (cosine similarity) is at least ``threshold``.

    Blocks of r rows (r <= ``chunk_size``, r x N <= 64 Mi) are compared with the rows from the
    block's first on; memory is O(r x N) whatever N.

    Yields:
        ``(i (m,), j (m,), similarities (m,), rows done)`` per block, ordered by i then j.
    """
    n = embeddings.shape[0]
    rows = max(1, min(chunk_size, _BLOCK_ELEMENTS // max(n, 1)))
    for start in range(0, n, rows):
        block = embeddings[start : start + rows]  # (r, D)
        sims = block @ embeddings[start:].T  # (r, N - start); column c is row start + c
        cols = torch.arange(sims.shape[1], device=sims.device)  # (N - start,)
        later = cols[None, :] > torch.arange(len(block), device=sims.device)[:, None]  # (r, N - start): j > i
        i, j = torch.nonzero((sims >= threshold) & later, as_tuple=True)  # (m,) each, row-major
        yield i + start, j + start, sims[i, j], start + len(block)


def embed(
    model: nn.Module,
    batches: Batches,
    transform: Callable[[Tensor], Tensor],
    accelerator: Accelerator,
    items: Sequence[str],
    out: Path,
    neighbors: Optional[int] = None,
    duplicates: Optional[float] = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the files of ``sslkit embed`` (see the module docstring) into ``out``.

    Args:
        model: the feature network, on ``accelerator.device``.
        batches: the dataset's items in index order, ``len(items)`` of them, one process. The
            rows of files it skipped (``data.bad_images=skip``) are left out, and listed.
        transform: uint8 images -> the normalised float images ``model`` takes.
        accelerator: device and autocast; must be a single process.
        items: the path or key of each item (``sslkit.data.item_keys``).
        out: the folder, created if missing; files of an earlier embed there are replaced.
        neighbors: K: write ``neighbors.jsonl``.
        duplicates: T in [-1, 1]: write ``duplicates.jsonl``.
        chunk_size: query rows per search call and most rows per duplicate block.
        progress: show the tqdm bar (main process only).

    Returns:
        ``{"items": N, "dim": D, "normalized": True, "skipped": [files left out], "files": [...],
        "duplicate_pairs": m (with duplicates)}``.
    """
    check_embed_options(neighbors, duplicates)
    if accelerator.num_processes > 1:
        raise UserError("sslkit embed runs in one process: start it with `sslkit embed`, not `accelerate launch`")
    bad = next((key for key in items if "\n" in key or "\r" in key), None)
    if bad is not None:
        raise UserError(f"item {bad!r} has a line break in its name, which items.txt (one item per line) cannot hold: "
                        "rename the file")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (*FILES, NEIGHBORS, DUPLICATES, SUMMARY):
        (out / stale).unlink(missing_ok=True)
    embeddings = write_embeddings(model, batches, transform, accelerator, len(items), out / "embeddings.npy",
                                  progress)
    skipped = batches.skipped_files  # data.bad_images=skip: their rows hold the next image; dropped
    if skipped:
        keep = np.array([key not in skipped for key in items])  # (N,) bool
        embeddings = _keep_rows(embeddings, keep, out / "embeddings.npy", chunk_size)
        items = [key for key, kept in zip(items, keep) if kept]
    (out / "items.txt").write_text("".join(f"{key}\n" for key in items), encoding="utf-8")
    index = flat_index(embeddings, chunk_size)
    faiss.write_index(index, str(out / "index.faiss"))
    files = list(FILES)
    result: dict[str, Any] = {"items": len(items), "dim": embeddings.shape[1], "normalized": True,
                              "skipped": sorted(skipped)}
    if neighbors is not None or duplicates is not None:
        on_device = accelerator.device.type != "cpu"
        bank = torch.from_numpy(embeddings)  # (N, D): the memory map, no copy
        bank = bank.to(accelerator.device) if on_device else bank
        if on_device:
            index = None  # the GPU search reads `bank`; the CPU copy is not needed any more
        if neighbors is not None:
            with (out / NEIGHBORS).open("w", encoding="utf-8") as f, _bar(len(items), "neighbors", progress) as bar:
                for start, sims, idx in nearest_neighbors(bank, neighbors, chunk_size, index):
                    for r, (row_sims, row_idx) in enumerate(zip(sims.tolist(), idx.tolist())):
                        near = [{"row": j, "item": items[j], "similarity": round(s, 6)}
                                for j, s in zip(row_idx, row_sims)]
                        f.write(json.dumps({"row": start + r, "item": items[start + r], "neighbors": near}) + "\n")
                    bar.update(len(sims))
            files.append(NEIGHBORS)
        if duplicates is not None:
            pairs = 0
            with (out / DUPLICATES).open("w", encoding="utf-8") as f, _bar(len(items), "duplicates", progress) as bar:
                for i, j, sims, done in duplicate_pairs(bank, duplicates, chunk_size):
                    for a, b, s in zip(i.tolist(), j.tolist(), sims.tolist()):
                        f.write(json.dumps({"rows": [a, b], "items": [items[a], items[b]],
                                            "similarity": round(s, 6)}) + "\n")
                    pairs += len(i)
                    bar.update(done - bar.n)
            files.append(DUPLICATES)
            result["duplicate_pairs"] = pairs
    result["files"] = files
    return result
