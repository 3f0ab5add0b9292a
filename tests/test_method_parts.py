"""The parts of BYOL, MoCo v3, DINO, Barlow Twins, VICReg and MAE: losses against lightly and
written-out formulas, heads against lightly's, the EMA encoder, MAE's masking, the view presets."""

import copy
import doctest
import importlib
import math
import pkgutil

import lightly.loss
import pytest
import timm
import torch
import torch.nn.functional as F
from lightly.models.modules import DINOProjectionHead
from torch import nn

from sslkit.augment import ViewPipeline, augment_config, create_augment
from sslkit.config import load_config
from sslkit.engine.optim import create_optimizer
from sslkit.errors import UserError
import sslkit.losses
from sslkit.losses import (
    BarlowTwinsLoss,
    DINOLoss,
    MAELoss,
    MoCoV3Loss,
    NegativeCosineLoss,
    VICRegLoss,
    teacher_temperature,
)
from sslkit.methods import create_method
from tests.conftest import set_step
from sslkit.models import (
    DINOHead,
    MAEDecoder,
    MomentumEncoder,
    cosine_momentum,
    encode_visible,
    mlp_head,
    patchify,
    random_token_mask,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=_gen(seed))


def _close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- tiny models and methods

TINY_CNN = ["model.backbone=tiny_cnn", "model.width=8"]
TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)  # 4 x 4 patches of 4 px


def make_method(*overrides):
    torch.manual_seed(0)
    return create_method(load_config(None, list(overrides)))


def byol_method(*extra):
    return make_method(*TINY_CNN, "method.name=byol", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
                       "method.pred_hidden_dim=32", *extra)


def dino_method(*extra):
    return make_method(*TINY_CNN, "method.name=dino", "augment.preset=multicrop", "augment.local_crops=2",
                       "augment.size=16", "augment.local_size=8", "method.proj_hidden_dim=32",
                       "method.bottleneck_dim=16", "method.proj_output_dim=64", *extra)


def mae_method(*extra):
    kwargs = ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items())
    return make_method("method.name=mae", "augment.preset=single", "model.backbone=vit_tiny_patch16_224",
                       f"model.timm_kwargs={{{kwargs}, global_pool: avg, fc_norm: false}}",
                       "method.decoder_dim=16", "method.decoder_depth=1", "method.decoder_heads=2", *extra)


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT).eval()


# ---------------------------------------------------------------- docstring examples

# every loss module (one loss per file, each with an example) and these models modules
DOCUMENTED = [f"sslkit.losses.{m.name}" for m in pkgutil.iter_modules(sslkit.losses.__path__) if m.name != "arguments"]
DOCUMENTED += ["sslkit.models.heads", "sslkit.models.memory_bank", "sslkit.models.momentum"]


@pytest.mark.parametrize("name", DOCUMENTED + ["sslkit.models.masking"])
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0
    # every module with an Example section has its examples collected (masking has none)
    assert (result.attempted > 0) == (name in DOCUMENTED)


# ---------------------------------------------------------------- negative cosine


def test_negative_cosine_equals_its_formula_and_closed_forms():
    # F.cosine_similarity is its body, so not a reference: the formula is written out, lightly's
    # class compared, and rows with a known cosine are checked.
    x0, x1 = _randn(8, 16), _randn(8, 16, seed=1)
    direct = -((x0 * x1).sum(1) / (x0.norm(dim=1) * x1.norm(dim=1))).mean()
    _close(NegativeCosineLoss()(x0, x1), direct)
    _close(NegativeCosineLoss()(x0, x1), lightly.loss.NegativeCosineSimilarity()(x0, x1))
    # same direction (cos 1), opposite (-1), orthogonal (0), 45 degrees (1/sqrt 2); lengths do not matter
    a = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    b = torch.tensor([[5.0, 0.0], [-4.0, -2.0], [7.0, 0.0], [2.0, 2.0]])
    _close(NegativeCosineLoss()(a, b), torch.tensor(-(1 - 1 + 0 + 2 ** -0.5) / 4))


# ---------------------------------------------------------------- DINO


def dino_direct(teacher, student, center, teacher_temp, student_temp):
    """Mean over pairs (teacher view i, student view j), i != j, and the batch of
    H(softmax((t_i - c) / teacher_temp), softmax(s_j / student_temp))."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        p = F.softmax((t - center) / teacher_temp, dim=-1)
        for j, s in enumerate(student):
            if i != j:
                total = total - (p * F.log_softmax(s / student_temp, dim=-1)).sum(-1).mean()
                pairs += 1
    return total / pairs


def test_dino_loss_equals_formula_and_moves_its_centre():
    k, m, student_temp = 16, 0.8, 0.2
    loss_fn = DINOLoss(output_dim=k, student_temp=student_temp, center_momentum=m)
    teacher = [_randn(4, k, seed=i) for i in range(2)]
    student = [_randn(4, k, seed=10 + i) for i in range(4)]  # 2 global + 2 local views
    _close(loss_fn(teacher, student, teacher_temp=0.05), dino_direct(teacher, student, 0.0, 0.05, student_temp))
    center = (1 - m) * torch.stack(teacher).mean(dim=(0, 1))  # m * 0 + (1 - m) * mean
    _close(loss_fn.center.flatten(), center)

    # the second call centres the teacher with the updated centre, then moves it again
    teacher2 = [_randn(4, k, seed=20 + i) for i in range(2)]
    _close(loss_fn(teacher2, student, teacher_temp=0.07),
           dino_direct(teacher2, student, center, 0.07, student_temp))
    _close(loss_fn.center.flatten(), m * center + (1 - m) * torch.stack(teacher2).mean(dim=(0, 1)))


def test_teacher_temperature_schedule():
    warm, final = 0.02, 0.06
    assert teacher_temperature(0, final, warm, 4) == pytest.approx(warm)
    assert teacher_temperature(1, final, warm, 4) == pytest.approx(warm + (final - warm) / 4)
    assert teacher_temperature(2, final, warm, 4) == pytest.approx((warm + final) / 2)
    assert teacher_temperature(2.5, final, warm, 4) == pytest.approx(warm + (final - warm) * 2.5 / 4)
    for epoch in (4, 4.5, 100):
        assert teacher_temperature(epoch, final, warm, 4) == pytest.approx(final)
    for epoch in (0, 0.5, 3):  # no warm-up: the final temperature from the start
        assert teacher_temperature(epoch, final, warm, 0) == pytest.approx(final)


# ---------------------------------------------------------------- MAE loss


def mae_direct(pred, target, norm_pix):
    if norm_pix:
        p = target.shape[-1]
        mean = target.sum(-1, keepdim=True) / p
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (p - 1)  # unbiased
        target = (target - mean) / (var + 1e-6) ** 0.5
    return ((pred - target) ** 2).mean()


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_equals_formula(norm_pix):
    pred, target = _randn(2, 5, 12), 3 + 2 * _randn(2, 5, 12, seed=1)  # not already normalised
    _close(MAELoss(norm_pix)(pred, target), mae_direct(pred, target, norm_pix))


def test_mae_loss_of_cases_with_a_closed_form():
    # without norm_pix, a prediction off by 0.5 everywhere costs 0.25 (a mean, not a sum)
    target = _randn(2, 5, 12)
    _close(MAELoss(norm_pix=False)(target + 0.5, target), torch.tensor(0.25))
    # with norm_pix, the patch (0, 2, 4, 6) (mean 3, unbiased variance 20/3) becomes
    # (-3, -1, 1, 3) / sqrt(20/3 + 1e-6): predicting that costs 0, predicting zeros its mean
    # square, 5 / (20/3 + 1e-6) = 0.75 (the biased variance would give 1, no normalisation 14).
    patch = torch.tensor([[[0.0, 2.0, 4.0, 6.0]]])
    perfect = torch.tensor([[[-3.0, -1.0, 1.0, 3.0]]]) / math.sqrt(20 / 3 + 1e-6)
    assert MAELoss(norm_pix=True)(perfect, patch).item() == pytest.approx(0.0, abs=1e-10)
    _close(MAELoss(norm_pix=True)(torch.zeros(1, 1, 4), patch), torch.tensor(5 / (20 / 3 + 1e-6)))


# ---------------------------------------------------------------- VICReg


def vicreg_direct(a, b, sim_weight, var_weight, cov_weight, eps=1e-4):
    """The VICReg paper's code: MSE, the mean of the two branches' std hinges, and the sum of the
    two branches' squared off-diagonal covariances divided by the dimension."""
    n, d = a.shape

    def hinge(z):
        std = torch.sqrt(((z - z.mean(0)) ** 2).sum(0) / (n - 1) + eps)
        return torch.relu(1 - std).mean()

    def off_diagonal(z):
        zc = z - z.mean(0)
        cov = zc.T @ zc / (n - 1)
        return (cov ** 2 * (1 - torch.eye(d))).sum() / d

    invariance = ((a - b) ** 2).mean()
    return (sim_weight * invariance + var_weight * (hinge(a) + hinge(b)) / 2
            + cov_weight * (off_diagonal(a) + off_diagonal(b)))


def test_vicreg_equals_lightly_and_formula():
    # per-dimension scales from 0.2 to 2: some dimensions are under the std hinge, some above
    a = _randn(16, 8) * torch.linspace(0.2, 2.0, 8)
    b = a + 0.5 * _randn(16, 8, seed=1)
    ours = VICRegLoss(sim_weight=3.0, var_weight=5.0, cov_weight=7.0)(a, b)
    _close(ours, lightly.loss.VICRegLoss(lambda_param=3.0, mu_param=5.0, nu_param=7.0)(a, b))
    _close(ours, vicreg_direct(a, b, 3.0, 5.0, 7.0))
    _close(VICRegLoss()(a, b), vicreg_direct(a, b, 25.0, 25.0, 1.0))  # the paper's weights by default


def test_vicreg_terms_sum_to_the_loss():
    a = _randn(16, 8) * torch.linspace(0.2, 2.0, 8)
    b = a + 0.5 * _randn(16, 8, seed=1)
    loss_fn = VICRegLoss(sim_weight=3.0, var_weight=5.0, cov_weight=7.0)
    terms = loss_fn.terms(a, b)
    assert list(terms) == ["invariance", "variance", "covariance"]
    assert torch.equal(sum(terms.values()), loss_fn(a, b))
    _close(sum(terms.values()), lightly.loss.VICRegLoss(lambda_param=3.0, mu_param=5.0, nu_param=7.0)(a, b))
    # each term is lightly's loss with the other two weights at 0
    alone = {"invariance": (3.0, 0.0, 0.0), "variance": (0.0, 5.0, 0.0), "covariance": (0.0, 0.0, 7.0)}
    for name, weights in alone.items():
        _close(terms[name], lightly.loss.VICRegLoss(*weights)(a, b))


# ---------------------------------------------------------------- Barlow Twins


def barlow_direct(a, b, lam):
    n, d = a.shape

    def standardise(z):
        mean = z.mean(0)
        return (z - mean) / torch.sqrt(((z - mean) ** 2).mean(0) + 1e-5)  # biased variance

    c = standardise(a).T @ standardise(b) / n
    on = ((torch.diagonal(c) - 1) ** 2).sum()
    off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lam * off


def test_barlow_twins_equals_lightly_and_formula():
    a = _randn(16, 6) * torch.linspace(0.5, 3.0, 6) + 1.0
    b = a + _randn(16, 6, seed=1)
    for lam in (5e-3, 0.5):
        ours = BarlowTwinsLoss(redundancy_weight=lam)(a, b)
        _close(ours, lightly.loss.BarlowTwinsLoss(lambda_param=lam)(a, b))
        _close(ours, barlow_direct(a, b, lam))


def test_barlow_twins_terms_sum_to_the_loss():
    a = _randn(16, 6) * torch.linspace(0.5, 3.0, 6) + 1.0
    b = a + _randn(16, 6, seed=1)
    loss_fn = BarlowTwinsLoss(redundancy_weight=0.5)
    terms = loss_fn.terms(a, b)
    assert list(terms) == ["invariance", "redundancy"]
    assert torch.equal(sum(terms.values()), loss_fn(a, b))
    lightly_loss = lightly.loss.BarlowTwinsLoss(lambda_param=0.5)(a, b)
    _close(sum(terms.values()), lightly_loss)
    on_diagonal = lightly.loss.BarlowTwinsLoss(lambda_param=0.0)(a, b)
    _close(terms["invariance"], on_diagonal)
    _close(terms["redundancy"], lightly_loss - on_diagonal)


@pytest.mark.parametrize("loss_fn", [BarlowTwinsLoss(), VICRegLoss()])
def test_batch_statistics_losses_reject_a_batch_of_one(loss_fn):
    with pytest.raises(UserError, match="at least 2.*got 1"):
        loss_fn(torch.randn(1, 4), torch.randn(1, 4))


# ---------------------------------------------------------------- MoCo v3


def mocov3_direct(query, key, t):
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    losses = []
    for i in range(len(q)):
        logits = torch.stack([q[i] @ k[j] / t for j in range(len(k))])
        losses.append(-(logits[i] - torch.logsumexp(logits, 0)))
    return 2 * t * torch.stack(losses).mean()


@pytest.mark.parametrize("t", [0.1, 0.2])
def test_mocov3_equals_formula_and_stops_key_gradient(t):
    query = _randn(6, 8).requires_grad_()
    key = _randn(6, 8, seed=1).requires_grad_()
    loss = MoCoV3Loss(temperature=t)(query, key)
    _close(loss, mocov3_direct(query.detach(), key.detach(), t))
    loss.backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert key.grad is None  # the keys are the momentum encoder's targets


# ---------------------------------------------------------------- heads


def _copy_into_lightly(ours, ref):
    """Our DINOHead's weights into lightly's DINOProjectionHead (strict: the MLPs must map one to one)."""
    ref.layers.load_state_dict(ours.mlp.layers.state_dict())
    weight = ours.last_layer.parametrizations.weight
    ref.last_layer.weight_g.data.copy_(weight.original0)
    ref.last_layer.weight_v.data.copy_(weight.original1)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # lightly's head uses the old API
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_matches_lightly(norm_last_layer, batch_norm):
    torch.manual_seed(0)
    ours = DINOHead(8, 32, 6, 20, layers=3, batch_norm=batch_norm, norm_last_layer=norm_last_layer)
    ref = DINOProjectionHead(8, 32, 6, 20, batch_norm=batch_norm, norm_last_layer=norm_last_layer)
    magnitude = ours.last_layer.parametrizations.weight.original0
    if not norm_last_layer:  # a learnable magnitude: make it other than 1 so that it matters
        with torch.no_grad():
            magnitude.uniform_(0.5, 2.0)
    _copy_into_lightly(ours, ref)
    x = _randn(5, 8)
    out, ref_out = ours(x), ref(x)
    _close(out, ref_out)
    assert magnitude.requires_grad == ref.last_layer.weight_g.requires_grad == (not norm_last_layer)
    # the same gradients for the prototypes' directions
    (out ** 2).sum().backward()
    (ref_out ** 2).sum().backward()
    _close(ours.last_layer.parametrizations.weight.original1.grad, ref.last_layer.weight_v.grad)


def test_dino_head_deep_copies_after_backward():
    # the EMA teacher is a deep copy of the student, taken after the student has run
    head = DINOHead(8, 16, 4, 12)
    x = _randn(3, 8)
    head(x).sum().backward()
    clone = copy.deepcopy(head)
    _close(clone(x), head(x))
    assert not clone.last_layer.parametrizations.weight.original0.requires_grad
    assert all(a is not b for a, b in zip(clone.parameters(), head.parameters()))


@pytest.mark.parametrize("layers, batch_norm, last_batch_norm",
                         [(1, True, False), (1, True, True), (2, True, False), (3, True, True),
                          (3, False, False), (3, False, True)])
def test_mlp_head_structure(layers, batch_norm, last_batch_norm):
    head = mlp_head(6, 10, 4, layers, batch_norm, last_batch_norm)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == layers
    assert [m.in_features for m in linears] == [6] + [10] * (layers - 1)
    assert [m.out_features for m in linears] == [10] * (layers - 1) + [4]
    has_last_norm = batch_norm and last_batch_norm
    assert len(norms) == (layers - 1 if batch_norm else 0) + has_last_norm
    last = list(head.layers)[-1]
    if has_last_norm:
        assert isinstance(last, nn.BatchNorm1d) and not last.affine
        assert all(m.affine for m in norms[:-1])
    else:
        assert isinstance(last, nn.Linear)
    assert head(_randn(5, 6)).shape == (5, 4)


def test_mlp_head_needs_a_layer():
    with pytest.raises(ValueError, match="layers=0"):
        mlp_head(6, 10, 4, layers=0)


# ---------------------------------------------------------------- momentum encoder


def test_momentum_encoder_update_is_ema_of_parameters_only():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ema = MomentumEncoder(online)
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in online.parameters())  # the copy, not the original, is frozen
    assert {"module.0.weight", "module.1.weight", "module.1.running_mean", "module.2.bias"} <= set(ema.state_dict())

    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(_randn(16, 4))  # a training-mode pass moves the online BatchNorm's running statistics
    before = [p.clone() for p in ema.parameters()]
    buffers = [b.clone() for b in ema.buffers()]
    ema.update(online, 0.7)
    for new, old, target in zip(ema.parameters(), before, online.parameters()):
        _close(new, 0.7 * old + 0.3 * target, atol=1e-6)
    for new, old, theirs in zip(ema.buffers(), buffers, online.buffers()):
        assert torch.equal(new, old) and not torch.equal(new, theirs)


def test_momentum_encoder_forward_has_no_graph():
    ema = MomentumEncoder(nn.Linear(4, 2))
    out = ema(_randn(3, 4).requires_grad_())
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(ValueError):
        ema.update(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2)), 0.9)


def test_cosine_momentum_schedule():
    base, end, total = 0.9, 1.0, 100
    assert cosine_momentum(0, total, base, end) == pytest.approx(base)
    assert cosine_momentum(total // 2, total, base, end) == pytest.approx((base + end) / 2)
    assert cosine_momentum(total, total, base, end) == pytest.approx(end)
    assert cosine_momentum(10 * total, total, base, end) == pytest.approx(end)  # clamped past the end
    values = [cosine_momentum(s, total, base, end) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    s = 30  # the BYOL formula, written out
    assert values[s] == pytest.approx(end - (end - base) * (math.cos(math.pi * s / total) + 1) / 2)


def test_byol_teacher_moves_by_scheduled_momentum_and_stays_out_of_the_optimizer():
    method = byol_method("method.momentum_base=0.9")
    student = method.student()
    teacher = list(method.teacher.parameters())
    assert len(teacher) == len(list(student.parameters()))  # the predictor has no teacher copy
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher]
    set_step(method, 50, 10, 100)  # half-way: m = (0.9 + 1) / 2
    method.after_optimizer_step(torch.tensor(0.0))  # a skipped step leaves the teacher alone
    assert all(torch.equal(new, old) for new, old in zip(teacher, before))
    method.after_optimizer_step(torch.tensor(1.0))
    for new, old, online in zip(teacher, before, student.parameters()):
        _close(new, 0.95 * old + 0.05 * online, atol=1e-6)

    cfg = load_config(None, TINY_CNN + ["method.name=byol"])
    optimizer = create_optimizer(method, cfg.optim, batch_size=8)
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_groups & {id(p) for p in teacher}
    assert in_groups == {id(p) for p in method.parameters() if p.requires_grad}
    assert any(id(p) in in_groups for p in method.prediction_head.parameters())


def _dino_views(batch=4):
    return [_randn(batch, 3, 16, 16, seed=i) for i in range(2)] + [_randn(batch, 3, 8, 8, seed=2 + i)
                                                                   for i in range(2)]


def test_dino_evaluates_its_teacher_and_checkpoints_its_centre():
    method = dino_method()
    features = method.feature_model()
    assert features is method.teacher.module[0] and features is not method.backbone
    assert not any(p.requires_grad for p in features.parameters())
    assert "criterion.center" in method.state_dict()


def test_dino_step_uses_teacher_on_global_views_and_scheduled_temperature():
    method = dino_method("method.warmup_teacher_temp=0.02", "method.teacher_temp=0.06",
                         "method.warmup_teacher_temp_epochs=2")
    set_step(method, 10, 10, 100)  # epoch 1 of a 2-epoch warm-up: temperature 0.04
    views = _dino_views()
    center = method.criterion.center.clone()
    teacher = list(method.teacher(torch.cat(views[:2])).chunk(2))
    student = list(method.projection_head(method.backbone(torch.cat(views[:2]))).chunk(2))
    student += list(method.projection_head(method.backbone(torch.cat(views[2:]))).chunk(2))
    expected = dino_direct(teacher, student, center, 0.04, method.cfg.method.student_temp)
    terms, features = method.ssl_step(views)
    loss = terms["dino"]
    _close(loss, expected)
    assert features.shape == (4, method.backbone.num_features)


def test_dino_drops_last_layer_gradients_during_freeze():
    method = dino_method("method.freeze_last_layer_epochs=1")
    last = method.projection_head.last_layer
    direction = last.parametrizations.weight.original1
    first_mlp = next(method.projection_head.mlp.parameters())
    for step, frozen in ((5, True), (10, False), (25, False)):  # epochs 0.5, 1.0, 2.5
        method.zero_grad()
        set_step(method, step, 10, 100)
        method.ssl_step(_dino_views())[0]["dino"].backward()
        assert direction.grad is not None
        method.before_optimizer_step()
        assert all(p.grad is None for p in last.parameters()) == frozen
        assert first_mlp.grad is not None  # the rest of the head keeps its gradients


# ---------------------------------------------------------------- masking


def patchify_direct(images, p):
    """(B, C, H, W) -> (B, L, p * p * C): patches row by row, each patch's pixels row by row with
    the channels last (MAE's layout)."""
    b, c, h, w = images.shape
    patches = [images[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p].permute(0, 2, 3, 1).reshape(b, -1)
               for r in range(h // p) for col in range(w // p)]
    return torch.stack(patches, dim=1)


def patch_pixels(images, index, p):
    """A view of patch ``index``'s pixels (all images, all channels)."""
    grid = images.shape[-1] // p
    r, c = divmod(int(index), grid)
    return images[..., r * p:(r + 1) * p, c * p:(c + 1) * p]


def test_patchify_layout():
    images = _randn(2, 3, 8, 8)
    assert torch.equal(patchify(images, 4), patchify_direct(images, 4))


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_random_token_mask_is_a_split_permutation(ratio):
    batch, length = 6, 16
    keep, mask = random_token_mask(batch, length, ratio, _gen(0))
    k = int(length * (1 - ratio))
    assert keep.shape == (batch, k) and mask.shape == (batch, length - k)
    assert torch.equal(torch.cat([keep, mask], 1).sort(1).values, torch.arange(length).expand(batch, -1))
    assert len({tuple(sorted(row.tolist())) for row in keep}) > 1  # each row draws its own mask
    again = random_token_mask(batch, length, ratio, _gen(0))
    assert torch.equal(keep, again[0]) and torch.equal(mask, again[1])


def test_random_token_mask_shards_equal_the_global_draw():
    batch = 3
    keep, mask = random_token_mask(2 * batch, 16, 0.75, _gen(1))
    shards = [random_token_mask(batch, 16, 0.75, _gen(1), shard=(rank, 2)) for rank in (0, 1)]
    assert torch.equal(torch.cat([s[0] for s in shards]), keep)
    assert torch.equal(torch.cat([s[1] for s in shards]), mask)
    assert not torch.equal(random_token_mask(batch, 16, 0.75, _gen(1))[0], shards[1][0])


@pytest.mark.parametrize("ratio", [0.0, 1.0, 0.99, -0.5])  # keeps 16, 0, 0 and 24 of 16 patches
def test_random_token_mask_rejects_ratios_that_keep_none_or_all(ratio):
    with pytest.raises(UserError, match="mask_ratio"):
        random_token_mask(2, 16, ratio)


def test_encode_visible_with_every_patch_is_forward_features():
    vit, images = tiny_vit(), _randn(2, 3, 16, 16)
    with torch.no_grad():
        full = vit.forward_features(images)  # (B, 1 + 16, E)
        _close(encode_visible(vit, images, torch.arange(16).expand(2, -1)), full)
        # positions are added before the patches are gathered: any order gives the same tokens, permuted
        perm = torch.stack([torch.randperm(16, generator=_gen(i)) for i in range(2)])
        out = encode_visible(vit, images, perm)
    _close(out[:, 0], full[:, 0])
    _close(out[:, 1:], torch.stack([full[b, 1:][perm[b]] for b in range(2)]))


def test_encode_visible_sees_only_visible_patches():
    vit, images = tiny_vit(), _randn(2, 3, 16, 16)
    keep, mask = random_token_mask(2, 16, 0.75, _gen(0))
    with torch.no_grad():
        out = encode_visible(vit, images, keep)
        assert out.shape == (2, 1 + 4, 32)
        hidden = images.clone()
        for b in range(2):
            for i in mask[b]:
                patch_pixels(hidden[b], i, 4).normal_(generator=_gen(5))
        _close(encode_visible(vit, hidden, keep), out, atol=1e-6)
        shown = images.clone()
        patch_pixels(shown[0], keep[0, 0], 4).add_(1.0)
        assert not torch.allclose(encode_visible(vit, shown, keep)[0], out[0], atol=1e-4)


def test_mae_decoder_predicts_the_masked_patches():
    decoder = MAEDecoder(num_patches=16, patch_size=4, encoder_dim=32, dim=16, depth=1, heads=2)
    keep, mask = random_token_mask(2, 16, 0.75, _gen(0))
    assert decoder(_randn(2, 1 + 4, 32), keep, mask).shape == (2, 12, 4 * 4 * 3)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_is_on_the_masked_patches(norm_pix):
    method = mae_method(f"method.norm_pix_loss={str(norm_pix).lower()}")
    images = _randn(2, 3, 16, 16)
    method.generator = _gen(0)
    terms, features = method.ssl_step([images])
    loss = terms["reconstruction"]

    keep, mask = random_token_mask(2, 16, 0.75, _gen(0))  # the same draw, made again
    tokens = encode_visible(method.backbone, images, keep)
    pred = method.decoder(tokens, keep, mask)
    assert pred.shape == (2, 12, 48)
    target = torch.stack([patchify_direct(images, 4)[b, mask[b]] for b in range(2)])
    _close(loss, mae_direct(pred, target, norm_pix))
    _close(features, tokens[:, 1:].mean(1))  # global_pool=avg: the mean of the visible patch tokens
    assert not method.backbone.pos_embed.requires_grad  # MAE's fixed sine-cosine positions


def test_mae_loss_ignores_visible_patches():
    # write the decoder's own prediction into the masked patches: the loss is then zero, whatever
    # the visible patches hold (the prediction depends on the visible patches only)
    method = mae_method("method.norm_pix_loss=false")
    images = _randn(2, 3, 16, 16)
    keep, mask = random_token_mask(2, 16, 0.75, _gen(0))
    with torch.no_grad():
        pred = method.decoder(encode_visible(method.backbone, images, keep), keep, mask)  # (B, M, 48)
        for b in range(2):
            for i, patch in zip(mask[b], pred[b]):
                patch_pixels(images[b], i, 4).copy_(patch.reshape(4, 4, 3).permute(2, 0, 1))
        method.generator = _gen(0)
        loss = method.ssl_step([images])[0]["reconstruction"]
    assert loss.item() < 1e-10


def test_mae_needs_a_vit():
    with pytest.raises(UserError, match="VisionTransformer"):
        make_method(*TINY_CNN, "method.name=mae")


# ---------------------------------------------------------------- presets


def _probs(views):
    return [p.cfg.blur_prob for p in views.pipelines], [p.cfg.solarize_prob for p in views.pipelines]


def test_byol_preset_view_probabilities():
    assert _probs(create_augment(augment_config(preset="byol"))) == ([1.0, 0.1], [0.0, 0.2])
    cfg = augment_config(preset="byol", view_blur_probs=(0.3, 0.7), view_solarize_probs=(0.4, 0.6))
    assert _probs(create_augment(cfg)) == ([0.3, 0.7], [0.4, 0.6])


@pytest.mark.parametrize("preset, key, values",
                         [("byol", "view_blur_probs", (0.5,)), ("byol", "view_solarize_probs", (0.1, 0.2, 0.3)),
                          ("multicrop", "view_blur_probs", (1.0, 0.1))])
def test_preset_rejects_wrong_number_of_view_probabilities(preset, key, values):
    with pytest.raises(ValueError, match=key):
        create_augment(augment_config(preset=preset, **{key: values}))


def test_multicrop_preset_views():
    cfg = augment_config(preset="multicrop", size=16, scale=(0.5, 1.0), local_crops=3, local_size=8,
                        local_scale=(0.1, 0.3))
    views = create_augment(cfg)
    pipelines = list(views.pipelines)
    assert len(pipelines) == 2 + 3
    assert [(p.cfg.size, p.cfg.scale) for p in pipelines] == [(16, (0.5, 1.0))] * 2 + [(8, (0.1, 0.3))] * 3
    assert _probs(views) == ([1.0, 0.1, 0.5, 0.5, 0.5], [0.0, 0.2, 0.0, 0.0, 0.0])
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8, generator=_gen(0))
    out = views(images, _gen(1))
    assert [tuple(v.shape) for v in out] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert not torch.allclose(out[2], out[3])  # each local view draws its own crop
    assert len(views.runs) == 2  # the global views in one call, the local ones in another
    assert len(create_augment(augment_config(preset="multicrop")).pipelines) == 2 + 8  # main_dino.py's 8 by default


@pytest.mark.parametrize("blur_kernel, local_kernel", [(0, 3), (23, 9)])
def test_multicrop_local_views_blur_even_when_small(blur_kernel, local_kernel):
    """A local view's blur once had a 1-tap (identity) kernel below 20 px."""
    cfg = augment_config(preset="multicrop", size=224, local_crops=1, local_size=16 if not blur_kernel else 96,
                        view_blur_probs=(0.0, 0.0, 1.0), blur_kernel=blur_kernel, jitter_prob=0.0, gray_prob=0.0)
    local = create_augment(cfg).pipelines[2]
    assert local.blur_kernel == local_kernel  # the global kernel scaled to the local size, or the default
    unblurred = ViewPipeline(local.cfg, blur_prob=0.0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=_gen(0))
    assert not torch.allclose(local(images, _gen(1)), unblurred(images, _gen(1)))


def test_single_preset_has_one_view():
    views = create_augment(augment_config(preset="single", size=16))
    out = views(torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8, generator=_gen(0)), _gen(1))
    assert len(out) == 1 and out[0].shape == (2, 3, 16, 16)


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(UserError, match="did you mean 'multicrop'"):
        create_augment(augment_config(preset="multicropp"))


def test_teacher_is_built_from_its_own_config_and_starts_as_the_student():
    """DINO's ViT student drops paths, its teacher (built without) does not; both start equal."""
    from timm.layers import DropPath

    vit = ("model.backbone=vit_tiny_patch16_224", "model.timm_kwargs={img_size: 16, patch_size: 4, embed_dim: 32, "
           "depth: 2, num_heads: 2, dynamic_img_size: true, drop_path_rate: 0.1}")
    method = make_method(*vit, "method={name: dino, proj_hidden_dim: 32, bottleneck_dim: 16, proj_output_dim: 64}",
                         "augment.local_crops=2", "augment.local_size=8")
    student_drops = [m for m in method.backbone.modules() if isinstance(m, DropPath)]
    teacher_drops = [m for m in method.teacher.module[0].modules() if isinstance(m, DropPath)]
    assert student_drops and not teacher_drops
    teacher_state = method.teacher.module.state_dict()
    for key, value in method.student().state_dict().items():
        assert torch.equal(teacher_state[key], value), key
    images = _randn(2, 3, 16, 16, seed=0)
    method.train()
    torch.testing.assert_close(method.teacher(images), method.teacher(images))  # no random paths
