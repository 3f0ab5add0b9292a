"""iBOT, DINOv2 and I-JEPA parts: their losses against lightly's (or written-out references),
Sinkhorn-Knopp centring, block masks, masked and padded ViT encoders, and the methods' terms.
(Each method's loss falling on a fixed batch, its CLI run and its 2-process equality come from
the registry-driven tests in test_methods.py, test_distributed.py and test_hot_path.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import IBOTPatchLoss as LightlyIBOTPatchLoss
from lightly.loss import KoLeoLoss as LightlyKoLeoLoss

from sslkit.augment import create_augment
from sslkit.config import load_config
from sslkit.errors import UserError
from sslkit.losses import DINOLoss, IBOTPatchLoss, IJEPALoss, KoLeoLoss, sinkhorn_knopp_teacher
from sslkit.methods import create_method
from sslkit.models import (IJEPAPredictor, block_mask, block_mask_bound, create_backbone, encode_masked,
                           encode_visible, ijepa_masks, select_true)
from sslkit.models.block_masks import ijepa_block_bound
from tests.conftest import set_step
from tests.test_distributed import METHOD_ARGS
from tests.test_methods import TINY


@pytest.mark.parametrize("p", [2, 1])
def test_koleo_equals_lightly(p):
    x = torch.randn(16, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ours, ref = KoLeoLoss(p=p)(x), LightlyKoLeoLoss(p=p)(x_ref)
    torch.testing.assert_close(ours, ref)
    ours.backward(), ref.backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert KoLeoLoss(p=p, gather_distributed=True)(x).item() == pytest.approx(ours.item())  # one process


def _mask(batch=4, side=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, side, side, generator=g) < 0.4
    mask[-1] = False  # an image without masked patches
    return mask


@pytest.mark.parametrize("temp", [None, 0.07])
def test_ibot_patch_loss_equals_lightly(temp):
    mask = _mask()
    rows = int(mask.sum())
    ours = IBOTPatchLoss(output_dim=32, center_momentum=0.8)
    ref = LightlyIBOTPatchLoss(output_dim=32, center_momentum=0.8)
    for step in range(3):  # the centre moves alike
        teacher, student = torch.randn(rows, 32), torch.randn(rows, 32)
        torch.testing.assert_close(ours(teacher, student, mask, teacher_temp=temp),
                                   ref(teacher, student, mask, teacher_temp=temp))
    torch.testing.assert_close(ours.center, ref.center.value)


def test_ibot_patch_loss_with_a_padded_index_equals_the_masked_rows():
    """A fixed-length index (masked positions first, then unmasked ones as padding) gives the
    loss and centre of the masked rows alone."""
    mask = _mask()
    flat = mask.flatten()
    length = int(flat.sum()) + 7
    index, valid = select_true(flat, length)
    assert valid.sum() == flat.sum() and not valid[-7:].any()
    teacher, student = torch.randn(flat.numel(), 32), torch.randn(flat.numel(), 32)
    plain, padded = IBOTPatchLoss(output_dim=32), IBOTPatchLoss(output_dim=32)
    masked = flat.nonzero().flatten()
    torch.testing.assert_close(padded(teacher[index], student[index], mask, index=index),
                               plain(teacher[masked], student[masked], mask))
    torch.testing.assert_close(padded.center, plain.center)


def _dinov2_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    """dinov2/loss/dino_clstoken_loss.py's sinkhorn_knopp_teacher, one process, written out."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def test_sinkhorn_knopp_equals_dinov2_and_ignores_padding():
    logits = torch.randn(12, 6)
    expected = _dinov2_sinkhorn(logits, 0.1)
    torch.testing.assert_close(sinkhorn_knopp_teacher(logits, 0.1), expected)
    assert not torch.allclose(expected, F.softmax(logits / 0.1, dim=-1), atol=1e-3)  # it is not a softmax
    # rows marked invalid take no mass and leave the others as they were
    padded = torch.cat([logits[:5], torch.randn(3, 6) * 5, logits[5:]])
    valid = torch.tensor([True] * 5 + [False] * 3 + [True] * 7)
    q = sinkhorn_knopp_teacher(padded, 0.1, valid=valid)
    torch.testing.assert_close(q[valid], expected)
    assert (q[~valid] == 0).all()


def test_dino_loss_with_sinkhorn_knopp_centring():
    teacher = [torch.randn(4, 16) for _ in range(2)]
    student = [torch.randn(4, 16) for _ in range(3)]
    probs = _dinov2_sinkhorn(torch.cat(teacher), 0.05).chunk(2)  # both global views in one Sinkhorn, as dinov2
    logs = [F.log_softmax(s / 0.1, dim=-1) for s in student]
    pairs = [-(t * s).sum(-1).mean() for i, t in enumerate(probs) for j, s in enumerate(logs) if i != j]
    loss = DINOLoss(output_dim=16, center_mode="sinkhorn_knopp")
    torch.testing.assert_close(loss(teacher, student, teacher_temp=0.05), sum(pairs) / len(pairs))
    assert (loss.center == 0).all()  # the centre is not used
    with pytest.raises(ValueError, match="sinkhorn_knopp"):
        DINOLoss(center_mode="median")


def test_ijepa_loss_is_the_mean_over_valid_patches():
    pred, target = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    valid = torch.rand(3, 5) < 0.6
    valid[0, 0] = True
    assert IJEPALoss()(pred, target).item() == pytest.approx(F.smooth_l1_loss(pred, target).item())
    assert IJEPALoss("l2")(pred, target, valid).item() == pytest.approx(F.mse_loss(pred[valid], target[valid]).item())
    assert IJEPALoss()(pred, target, valid).item() == pytest.approx(F.smooth_l1_loss(pred[valid], target[valid]).item())


def test_block_masks_follow_dinov2s_ratios():
    grid = (14, 14)
    masks = block_mask(64, grid, 0.5, (0.1, 0.5), generator=torch.Generator().manual_seed(0), views=2)
    assert masks.shape == (128, 14, 14) and masks.dtype == torch.bool
    counts = masks.flatten(1).sum(1)
    assert (counts > 0).sum() == 64  # int(128 * 0.5) images masked
    assert counts.max() <= 98  # never above the largest ratio, 0.5 of 196
    ratios = counts[counts > 0].float() / 196
    assert 0.25 < ratios.mean() < 0.31  # the slices of [0.1, 0.5] average 0.3; the sampler stops just below
    assert ratios.min() >= 0.05
    assert counts.sum() <= block_mask_bound(64, grid, views=2)


def test_block_masks_do_not_depend_on_the_split():
    kw = {"grid": (6, 6), "mask_probability": 0.5, "views": 2}
    whole = block_mask(8, generator=torch.Generator().manual_seed(3), **kw).view(2, 8, 6, 6)
    halves = [block_mask(4, generator=torch.Generator().manual_seed(3), shard=(r, 2), **kw).view(2, 4, 6, 6)
              for r in range(2)]
    torch.testing.assert_close(torch.cat(halves, dim=1), whole)
    assert all(h.flatten(1).sum() <= block_mask_bound(4, (6, 6), 0.5, world_size=2, views=2) for h in halves)


def test_ijepa_masks_are_blocks_of_one_size():
    grid = (14, 14)
    context, targets = ijepa_masks(16, grid, generator=torch.Generator().manual_seed(0))
    assert context.shape == (16, 14, 14) and targets.shape == (16, 4, 14, 14)
    sizes = targets.flatten(2).sum(-1)
    assert (sizes == sizes[0, 0]).all()  # one target size per step
    assert 0.15 * 196 * 0.7 <= sizes[0, 0] <= ijepa_block_bound(grid, (0.15, 0.2), (0.75, 1.5))
    rows, cols = targets.any(-1), targets.any(-2)  # each target is a rectangle
    assert (rows.sum(-1) * cols.sum(-1) == sizes).all()
    assert not (context[:, None] & targets).any()  # the context leaves the targets out
    assert (context.flatten(1).sum(1) > 10).all()
    assert context.flatten(1).sum(1).max() <= ijepa_block_bound(grid, (0.85, 1.0), (1.0, 1.0))
    # the same masks however the batch is split
    halves = [ijepa_masks(8, grid, generator=torch.Generator().manual_seed(0), shard=(r, 2)) for r in range(2)]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), context)
    torch.testing.assert_close(torch.cat([h[1] for h in halves]), targets)


def _vit(**kw):
    cfg = load_config(None, ["model.backbone=vit_tiny_patch16_224", "model.timm_kwargs={img_size: 16, patch_size: 4, "
                             f"embed_dim: 32, depth: 2, num_heads: 2, reg_tokens: {kw.get('reg', 0)}}}"])
    torch.manual_seed(0)
    return create_backbone(cfg.model).eval()


def test_masked_and_padded_encoders():
    vit = _vit(reg=2)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(encode_masked(vit, images), vit.forward_features(images))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    token = torch.randn(32)
    masked = encode_masked(vit, images, mask, token)
    replaced = vit.patch_embed(images).clone()
    replaced[0, [0, 1, 4, 5]] = token
    torch.testing.assert_close(masked, vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(replaced)))))
    # padding entries (valid False) change nothing for the valid ones
    keep = torch.tensor([[0, 3, 9], [2, 5, 15]])
    plain = encode_visible(vit, images, keep)
    padded = encode_visible(vit, images, torch.cat([keep, torch.tensor([[1, 1], [0, 7]])], 1),
                            torch.tensor([[True] * 3 + [False] * 2] * 2))
    prefix = vit.num_prefix_tokens
    assert prefix == 3  # the class token and 2 registers
    torch.testing.assert_close(padded[:, :prefix + 3], plain)


def test_ijepa_predictor_ignores_padding():
    predictor = IJEPAPredictor(num_patches=16, embed_dim=32, dim=16, depth=2, heads=2).eval()
    context = torch.randn(2, 5, 32)
    ctx = torch.tensor([[0, 1, 2, 8, 9], [4, 5, 6, 7, 3]])
    ctx_valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    tgt = torch.tensor([[[12, 13, 0]], [[14, 15, 3]]])
    tgt_valid = torch.tensor([[[True, True, False]], [[True, True, False]]])
    out = predictor(context, ctx, ctx_valid, tgt, tgt_valid)
    ref0 = predictor(context[:1, :3], ctx[:1, :3], ctx_valid[:1, :3], tgt[:1, :, :2], tgt_valid[:1, :, :2])
    torch.testing.assert_close(out[:1, :, :2], ref0)


def _method(name, *extra):
    cfg = load_config(None, [*TINY, *METHOD_ARGS[name], *extra])
    torch.manual_seed(0)
    method = create_method(cfg, num_classes=10)
    set_step(method, 0, steps_per_epoch=10, total_steps=100)
    views = create_augment(cfg.augment)(torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8),
                                        torch.Generator().manual_seed(0))
    method.generator = torch.Generator().manual_seed(1)
    return method, views


@pytest.mark.parametrize("name, terms", [("ibot", {"dino", "ibot"}), ("dinov2", {"dino", "ibot", "koleo"}),
                                         ("ijepa", {"ijepa"})])
def test_loss_terms_by_name(name, terms):
    method, views = _method(name)
    out = method(views)
    assert set(out["terms"]) == terms and all(math.isfinite(v) for v in out["terms"].values())


def test_dinov2_with_register_tokens_and_separate_heads():
    method, views = _method("dinov2", "model.timm_kwargs.reg_tokens=4")
    assert method.backbone.num_prefix_tokens == 5 and method.projection_head.patch is not None
    assert math.isfinite(method(views)["loss"].item())
    assert method.patch_criterion.center_mode == method.criterion.center_mode == "sinkhorn_knopp"


@pytest.mark.parametrize("name", ["ibot", "ijepa"])
def test_a_cnn_backbone_is_one_clear_error(name):
    with pytest.raises(UserError, match="VisionTransformer"):
        create_method(load_config(None, [*TINY, f"method={{name: {name}}}"]))


def test_ijepa_views_must_fit_the_vit():
    with pytest.raises(UserError, match="img_size=24"):
        _method("ijepa", "augment.size=24")
