"""k-NN evaluation: scores against lightly, hand-computed cases, features and the monitor."""

from __future__ import annotations

import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from torch import Tensor, nn

import sslkit.eval.knn as knn_module
from sslkit.eval import KNNMonitor, extract_features, knn_accuracy, knn_scores, knn_scores_multi

C = 10


def to_float(images: Tensor) -> Tensor:
    return images.float() / 255


def dense_reference(query: Tensor, bank: Tensor, labels: Tensor, k: int, t: float) -> Tensor:
    """lightly's knn_predict up to its final argsort: (Q, C) summed exp(sim/T) votes."""
    sims, idx = (F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T).topk(k, dim=1)
    return torch.zeros(query.shape[0], C).scatter_add_(1, labels[idx], (sims / t).exp())


@pytest.fixture(scope="module")
def gaussian() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(2000, 64, generator=g), dim=1)  # continuous: no near-ties
    query = F.normalize(torch.randn(300, 64, generator=g), dim=1)
    labels = torch.randint(0, C, (2000,), generator=g)
    return query, bank, labels


@pytest.mark.parametrize("k,t", [(20, 0.07), (200, 0.1)])
@pytest.mark.parametrize("chunk_size", [300, 64])  # one chunk; several with a ragged last one
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_matches_lightly(gaussian, k: int, t: float, chunk_size: int, backend: str) -> None:
    query, bank, labels = gaussian
    scores = knn_scores(query, bank, labels, C, k=k, temperature=t, chunk_size=chunk_size, backend=backend)
    assert_matches_lightly(scores, query, bank, labels, k, t)


def assert_matches_lightly(scores: Tensor, query: Tensor, bank: Tensor, labels: Tensor, k: int, t: float) -> None:
    assert scores.shape == (query.shape[0], C)
    torch.testing.assert_close(scores, dense_reference(query, bank, labels, k, t), rtol=1e-4, atol=1e-6)
    # lightly returns only the class ranking; it must agree wherever the order is defined
    # (classes with votes; zero-vote classes tie).
    ranking = knn_predict(query, bank.T, labels, C, knn_k=k, knn_t=t)  # (Q, C)
    assert torch.equal(scores.argmax(dim=1), ranking[:, 0])
    ours = scores.argsort(dim=1, descending=True)
    voted = scores.gather(1, ours) > 0
    assert voted.sum(1).min() >= 2  # the comparison below covers more than the top-1
    assert torch.equal(ours[voted], ranking[voted])


@pytest.mark.parametrize("chunk_size", [300, 64])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_multi_k_matches_lightly_per_k(gaussian, chunk_size: int, backend: str) -> None:
    query, bank, labels = gaussian
    ks = (200, 20, 5, 20)  # unsorted, with a duplicate
    multi = knn_scores_multi(query, bank, labels, C, ks, temperature=0.1, chunk_size=chunk_size, backend=backend)
    assert sorted(multi) == [5, 20, 200]
    for k in multi:
        assert_matches_lightly(multi[k], query, bank, labels, k, 0.1)
        # knn_scores is the one-k case of the same search
        torch.testing.assert_close(multi[k], knn_scores(query, bank, labels, C, k, 0.1, chunk_size, backend),
                                   rtol=1e-6, atol=0.0)


def test_multi_k_beyond_bank() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[2.0, 1.0]])  # cosines: 2/sqrt5, 1/sqrt5, -2/sqrt5
    a, b, t = 2 / math.sqrt(5), 1 / math.sqrt(5), 0.5
    multi = knn_scores_multi(q, bank, labels, 3, ks=(1, 2, 10), temperature=t)
    assert torch.allclose(multi[1], torch.tensor([[math.exp(a / t), 0.0, 0.0]]))
    assert torch.allclose(multi[2], torch.tensor([[math.exp(a / t), math.exp(b / t), 0.0]]))
    assert torch.allclose(multi[10], torch.tensor([[math.exp(a / t), math.exp(b / t) + math.exp(-a / t), 0.0]]))
    with pytest.raises(ValueError, match="ks"):
        knn_scores_multi(q, bank, labels, 3, ks=())


def test_torch_backend_memory_blocks(gaussian, monkeypatch) -> None:
    query, bank, labels = gaussian
    monkeypatch.setattr(knn_module, "_SIM_ELEMENTS", 2000 * 7)  # (7, N) similarity blocks
    scores = knn_scores(query, bank, labels, C, k=20, temperature=0.07, backend="torch")
    torch.testing.assert_close(scores, dense_reference(query, bank, labels, 20, 0.07), rtol=1e-4, atol=1e-6)


def test_unnormalised_input_is_cosine(gaussian) -> None:
    query, bank, labels = gaussian
    g = torch.Generator().manual_seed(1)
    scaled_q = query * torch.rand(300, 1, generator=g).add(0.1) * 50
    scaled_b = bank * torch.rand(2000, 1, generator=g).add(0.1) * 50
    # exp(sim / 0.07) reaches ~1e6, so compare relatively
    torch.testing.assert_close(knn_scores(scaled_q, scaled_b, labels, C), knn_scores(query, bank, labels, C),
                               rtol=1e-5, atol=0.0)


def test_closed_form() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    t = 0.5
    # the nearest alone votes with weight exp(1 / T)
    assert torch.allclose(knn_scores(torch.tensor([[3.0, 0.0]]), bank, labels, 3, k=1, temperature=t),
                          torch.tensor([[math.exp(1 / t), 0.0, 0.0]]))
    q = torch.tensor([[2.0, 1.0]])  # cosines: 2/sqrt5, 1/sqrt5, -2/sqrt5
    a, b = 2 / math.sqrt(5), 1 / math.sqrt(5)
    two = knn_scores(q, bank, labels, 3, k=2, temperature=t)
    assert torch.allclose(two, torch.tensor([[math.exp(a / t), math.exp(b / t), 0.0]]))
    # k beyond the bank uses the whole bank
    every = knn_scores(q, bank, labels, 3, k=10, temperature=t)
    assert torch.allclose(every, torch.tensor([[math.exp(a / t), math.exp(b / t) + math.exp(-a / t), 0.0]]))


def test_knn_accuracy() -> None:
    scores = torch.tensor([
        [0.0, 5.0, 1.0, 0.0, 0.0, 0.0],  # label 1: top-1
        [3.0, 1.0, 4.0, 0.5, 0.2, 0.1],  # label 0: second -> top-5 only
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: sixth -> neither
        [2.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 5: no vote -> neither, though zero-ties could rank it 5th
    ])
    labels = torch.tensor([1, 0, 0, 5])
    assert knn_accuracy(scores, labels) == {"knn_top1": 0.25, "knn_top5": 0.5}
    assert knn_accuracy(scores, labels, topk=(1, 2, 10)) == {"knn_top1": 0.25, "knn_top2": 0.5, "knn_top10": 0.75}


def tiny_backbone() -> nn.Module:
    # Dropout makes a train-mode forward differ from the eval-mode one.
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.Dropout(0.5))


def make_batches(images: Tensor, labels: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(images.split(sizes), labels.split(sizes)))


def test_extract_features() -> None:
    torch.manual_seed(0)
    model = tiny_backbone()
    images = torch.randint(0, 256, (11, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randperm(11)  # a label names its image
    feats, got = extract_features(model, make_batches(images, labels, [4, 4, 3]), to_float)
    assert model.training
    assert feats.dtype == torch.float32 and got.dtype == torch.int64 and feats.shape == (11, 8)
    model.eval()
    expected = model(to_float(images))
    assert torch.allclose(feats, expected[torch.argsort(labels)][got])  # row i is image got[i]
    assert sorted(got.tolist()) == list(range(11))
    extract_features(model, make_batches(images, labels, [11]), to_float)
    assert not model.training  # eval stays eval


def clusters(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Images near one of two random prototypes; the label is the prototype."""
    protos = torch.tensor([[40.0], [215.0]]) + 30 * torch.randn(2, 48, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, 2, (n,), generator=g)
    images = protos[labels] + 5 * torch.randn(n, 48, generator=g)
    return images.clamp(0, 255).to(torch.uint8).view(n, 3, 4, 4), labels


def cluster_setup() -> tuple[torch.Generator, nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """A seeded generator, a tiny backbone, a 300-image bank and 200 test images of two clusters."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = tiny_backbone()
    bank, bank_labels = clusters(300, g)
    test, test_labels = clusters(200, g)
    return g, model, bank, bank_labels, test, test_labels


def test_monitor_separable_and_shuffled() -> None:
    g, model, bank, bank_labels, test, test_labels = cluster_setup()
    monitor = KNNMonitor(make_batches(bank, bank_labels, [128, 128, 44]), make_batches(test, test_labels, [100, 100]),
                         to_float, num_classes=2, k=20, temperature=0.07)
    assert monitor(model) == {"knn_top1": 1.0, "knn_top5": 1.0}
    assert monitor(model) == {"knn_top1": 1.0, "knn_top5": 1.0}  # batches are re-iterated
    shuffled = KNNMonitor(make_batches(bank, torch.randint(0, 2, (300,), generator=g), [300]),
                          make_batches(test, test_labels, [200]), to_float, num_classes=2, k=20, temperature=0.07)
    assert 0.35 < shuffled(model)["knn_top1"] < 0.65


def test_monitor_extra_ks_equal_single_k_monitors() -> None:
    g, model, bank, bank_labels, test, test_labels = cluster_setup()
    flip = torch.rand(300, generator=g) < 0.3  # label noise: accuracy depends on k
    bank_labels = torch.where(flip, 1 - bank_labels, bank_labels)

    def monitor(k: int, ks: tuple[int, ...] | None = None) -> dict[str, float]:
        return KNNMonitor(make_batches(bank, bank_labels, [128, 172]), make_batches(test, test_labels, [200]),
                          to_float, num_classes=2, k=k, temperature=0.07, ks=ks)(model)

    multi = monitor(20, ks=(1, 20, 100))
    assert multi == {**monitor(20), "knn_top1_k1": monitor(1)["knn_top1"], "knn_top1_k100": monitor(100)["knn_top1"]}
    assert multi["knn_top1_k1"] != multi["knn_top1_k100"]  # the k values really differ


def _distributed_worker(rank: int, world: int, port: int) -> None:
    from accelerate import Accelerator

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world == 2
    torch.manual_seed(0)  # same model and data on both ranks
    model = tiny_backbone()
    g = torch.Generator().manual_seed(0)
    bank, bank_labels = clusters(13, g)
    test, test_labels = clusters(9, g)
    bank_labels[:4] = 1 - bank_labels[:4]  # some errors, so the counts are not trivially all right
    # disjoint shards of unequal length (7 and 6; 5 and 4), in uneven batches
    bank_shard = slice(0, 7) if rank == 0 else slice(7, 13)
    test_shard = slice(0, 5) if rank == 0 else slice(5, 9)
    ids = torch.arange(13)
    bank_batches = make_batches(bank[bank_shard], ids[bank_shard], [3, 3, 1] if rank == 0 else [3, 3])
    feats, got = extract_features(model, bank_batches, to_float, accelerator)
    assert sorted(got.tolist()) == list(range(13))  # every sample once, no padding
    model.eval()
    assert torch.allclose(feats, model(to_float(bank))[got])
    model.train()

    monitor = KNNMonitor(make_batches(bank[bank_shard], bank_labels[bank_shard], [4, 3] if rank == 0 else [6]),
                         make_batches(test[test_shard], test_labels[test_shard], [5] if rank == 0 else [2, 2]),
                         to_float, num_classes=2, k=3, temperature=0.1, ks=(1, 3))
    result = monitor(model, accelerator)
    with torch.no_grad():
        model.eval()
        scores = knn_scores_multi(model(to_float(test)), model(to_float(bank)), bank_labels, 2, ks=(1, 3),
                                  temperature=0.1)
        expected = knn_accuracy(scores[3], test_labels)
        expected["knn_top1_k1"] = knn_accuracy(scores[1], test_labels, topk=(1,))["knn_top1"]
    assert result == pytest.approx(expected)
    assert 0 < expected["knn_top1"] < 1


def test_distributed_gather_and_monitor() -> None:
    # spawn, not fork (accelerate's debug_launcher): a child forked after the parent ran
    # OpenMP code (earlier tests) can deadlock in its first parallel region.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_distributed_worker, args=(2, port), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("distributed k-NN workers hung")
