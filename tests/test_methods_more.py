"""SwAV, SimSiam, MoCo v2 and NNCLR against lightly's pieces: the losses on the same inputs, the
queues and support sets step by step, SwAV's prototypes (normalised, frozen, its queue's share)."""

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss
from lightly.models.modules import NNMemoryBankModule

from sslkit.config import load_config
from sslkit.losses import SwAVLoss
from sslkit.methods import create_method
from sslkit.methods.nnclr import nearest_neighbours
from tests.conftest import set_step
from tests.test_methods import TINY

# batch, projection width, queue rows (a multiple of B: lightly's bank drops a wrapping batch's rest)
B, D, L = 8, 16, 24


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _method(*overrides):
    torch.manual_seed(0)
    return create_method(load_config(None, [*TINY, *overrides]))


# ---------------------------------------------------------------- SwAV


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.2, "sinkhorn_iterations": 5, "sinkhorn_epsilon": 0.1}])
@pytest.mark.parametrize("local_crops, queue", [(0, False), (4, False), (2, True)])
def test_swav_loss_equals_lightly(kwargs, local_crops, queue):
    high = [_randn(B, 32, seed=i).requires_grad_() for i in range(2)]
    low = [_randn(B, 32, seed=10 + i).requires_grad_() for i in range(local_crops)]
    queued = [_randn(3 * B, 32, seed=20 + i) for i in range(2)] if queue else None
    ours = SwAVLoss(**kwargs)(high, low, queued)
    ours.backward()
    grads = [x.grad.clone() for x in high + low]
    for x in high + low:
        x.grad = None
    reference = SwaVLoss(**kwargs)(high, low, queued)
    reference.backward()
    assert ours.shape == ()
    torch.testing.assert_close(ours, reference.squeeze())
    for grad, x in zip(grads, high + low):
        torch.testing.assert_close(grad, x.grad)


def test_swav_loss_rejects_a_single_crop():
    with pytest.raises(Exception, match="at least 2 crops"):
        SwAVLoss()([torch.randn(4, 8)], [])


SWAV = [("method={name: swav, proj_hidden_dim: 32, proj_output_dim: 16, prototypes: 24, queue_length: 48, "
         "queue_start_epochs: 1}"), "train.batch_size=16", "augment.local_crops=2", "augment.local_size=8"]


def test_swav_prototypes_frozen_first_epoch_and_normalised_after_each_step():
    model = _method(*SWAV)
    w = model.prototypes.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(24))
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    for step, frozen in [(0, True), (9, True), (10, False)]:  # 10 steps per epoch
        set_step(model, step, steps_per_epoch=10, total_steps=40)
        model.zero_grad()
        model(views)["loss"].backward()
        model.before_optimizer_step()
        assert (w.grad is None) == frozen
    with torch.no_grad():
        w.add_(torch.randn_like(w))  # an optimiser step moved them off the sphere
    moved = w.detach().clone()
    model.after_optimizer_step(torch.tensor(0.0))  # a skipped step leaves them
    assert torch.equal(w, moved)
    model.after_optimizer_step(torch.tensor(1.0))
    torch.testing.assert_close(w, F.normalize(moved, dim=1))


def test_swav_queue_fills_after_its_start_and_is_used_once_full():
    model = _method(*SWAV)
    values = model.schedules(steps_per_epoch=10, total_steps=20)
    # starts at epoch 1 (step 10), 48 rows at batch 16: full after 3 steps
    assert values["queue_filling"].tolist() == [0.0] * 10 + [1.0] * 10
    assert values["queue_in_use"].tolist() == [0.0] * 13 + [1.0] * 7
    z = [F.normalize(_randn(16, 16, seed=i), dim=1) for i in range(2)]
    model.scheduled = {"queue_filling": 0.0, "queue_in_use": 0.0}
    assert model.queue_scores(z) is None
    before = [q.bank.clone() for q in model.queues]
    model.scheduled = {"queue_filling": 1.0, "queue_in_use": 0.0}
    assert model.queue_scores(z) is None  # filling, not used yet
    model.scheduled = {"queue_filling": 1.0, "queue_in_use": 1.0}
    queued = [q.bank.clone() for q in model.queues]
    scores = model.queue_scores(z)  # one process: the whole queue, before this batch joins it
    for s, q, b in zip(scores, queued, before):
        assert not torch.equal(q, b)
        torch.testing.assert_close(s, model.prototypes(q))


def test_swav_step_equals_lightlys_loss_with_the_queue():
    """The step's loss is lightly's SwaVLoss on the normalised projections' prototype scores,
    the queue's scores appended for the codes."""
    model = _method(*SWAV)
    model.scheduled = {"freeze_prototypes": 0.0, "queue_filling": 1.0, "queue_in_use": 1.0}
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    queued = [q.bank.clone() for q in model.queues]
    loss = model(views)["loss"]
    feats = torch.cat([model.backbone(torch.cat(views[:2])), model.backbone(torch.cat(views[2:]))])
    scores = model.prototypes(F.normalize(model.projection_head(feats), dim=1)).chunk(4)
    reference = SwaVLoss()(list(scores[:2]), list(scores[2:]), [model.prototypes(q) for q in queued])
    torch.testing.assert_close(loss, reference.squeeze())


# ---------------------------------------------------------------- SimSiam


def test_simsiam_equals_lightly_and_stops_the_projection_gradient():
    model = _method("method={name: simsiam, proj_hidden_dim: 32, proj_output_dim: 16, pred_hidden_dim: 8}")
    z0, z1 = _randn(B, 16).requires_grad_(), _randn(B, 16, seed=1).requires_grad_()
    loss = model.loss_terms(z0, z1)["simsiam"]
    p0, p1 = model.prediction_head(z0), model.prediction_head(z1)
    criterion = NegativeCosineSimilarity()
    torch.testing.assert_close(loss, 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach())))
    # stop-gradient: z1 gets gradient only through its own prediction p1
    (g,) = torch.autograd.grad(loss, z1)
    (g_pred,) = torch.autograd.grad(0.5 * criterion(model.prediction_head(z1), z0.detach()), z1)
    torch.testing.assert_close(g, g_pred)


# ---------------------------------------------------------------- MoCo v2


def _lightly_bank(bank, ours):
    """lightly's bank filled with our bank's rows (and its pointer at 0, as ours is)."""
    bank.bank.copy_(ours.bank)
    bank.bank_ptr.zero_()


def test_mocov2_step_and_queue_equal_lightlys_ntxent_with_a_memory_bank():
    """Query of view 0, key of view 1 by the momentum encoder, the queue's keys as negatives,
    the keys enqueued after the loss: lightly's NTXentLoss(memory_bank_size) step by step,
    wrapping around the queue."""
    model = _method(f"method={{name: mocov2, proj_hidden_dim: 32, proj_output_dim: {D}, queue_length: {L}}}")
    reference = NTXentLoss(temperature=0.2, memory_bank_size=(L, D))
    _lightly_bank(reference.memory_bank, model.criterion.memory_bank)
    for step in range(4):
        x0, x1 = torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16)
        with torch.no_grad():
            q = model.projection_head(model.backbone(x0)).requires_grad_()
            k = model.teacher(x1)
        loss = model([x0, x1])["loss"]
        torch.testing.assert_close(loss, reference(q, k), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.criterion.memory_bank.bank, reference.memory_bank.bank)


def test_mocov2_symmetric_is_lightlys_two_calls():
    """Both directions, as lightly's CIFAR-10 benchmark: the second call's queue holds the first's keys."""
    model = _method(f"method={{name: mocov2, proj_hidden_dim: 32, proj_output_dim: {D}, queue_length: {L}, "
                    "symmetric: true}")
    reference = NTXentLoss(temperature=0.2, memory_bank_size=(L, D))
    _lightly_bank(reference.memory_bank, model.criterion.memory_bank)
    x0, x1 = torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16)
    with torch.no_grad():
        q0, q1 = model.projection_head(model.backbone(torch.cat([x0, x1]))).chunk(2)  # one pass: BatchNorm
        k1, k0 = model.teacher(torch.cat([x1, x0])).chunk(2)
    loss = model([x0, x1])["loss"]
    expected = 0.5 * (reference(q0.requires_grad_(), k1) + reference(q1.requires_grad_(), k0))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.criterion.memory_bank.bank, reference.memory_bank.bank)


# ---------------------------------------------------------------- NNCLR


def test_nearest_neighbours_equal_lightlys():
    support = _randn(L, D, seed=3)
    x = _randn(B, D)
    bank = NNMemoryBankModule(size=(L, D))
    bank.bank.copy_(support)
    torch.testing.assert_close(nearest_neighbours(x, support), bank(x, update=False))


def test_nnclr_step_and_support_set_equal_lightlys_pieces():
    """lightly's NNCLR: NNMemoryBankModule (view 0 looked up, view 1 looked up and enqueued)
    and NTXentLoss between each neighbour and the other view's prediction, step by step."""
    model = _method(f"method={{name: nnclr, proj_hidden_dim: 32, proj_output_dim: {D}, pred_hidden_dim: 32, "
                    f"support_set_size: {L}, temperature: 0.5}}")
    bank, criterion = NNMemoryBankModule(size=(L, D)), NTXentLoss(temperature=0.5)
    _lightly_bank(bank, model.support_set)
    for step in range(4):
        z0, z1 = _randn(B, D, seed=2 * step), _randn(B, D, seed=2 * step + 1)
        loss = model.loss_terms(z0, z1)["nnclr"]
        p0, p1 = model.prediction_head(z0), model.prediction_head(z1)
        n0, n1 = bank(z0.detach(), update=False), bank(z1.detach(), update=True)
        torch.testing.assert_close(loss, 0.5 * (criterion(n0, p1) + criterion(n1, p0)))
        torch.testing.assert_close(model.support_set.bank, bank.bank)


@pytest.mark.parametrize("method, bank", [("mocov2", "criterion.memory_bank."), ("nnclr", "support_set.")])
def test_queues_are_in_the_checkpointed_state(method, bank):
    model = _method(f"method={{name: {method}, proj_hidden_dim: 32, proj_output_dim: {D}}}")
    assert {bank + "bank", bank + "ptr"} <= model.state_dict().keys()
