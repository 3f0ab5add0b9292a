"""Linear probes on cached, frozen-backbone features: one head per learning rate, one pass.

Protocol (:func:`train_linear_probes`):

1. Standardise every feature dimension with the mean and std of the TRAIN features,
   applied to train and test alike (a non-affine BatchNorm in front of the head, as in
   MAE's linear probe). Standardising rather than L2-normalising keeps the feature norm,
   which carries information, and puts every dimension on the scale the lr grid assumes.
2. Train L = len(lrs) linear heads (zero-initialised; softmax regression is convex, so
   zeros lose nothing) with SGD, momentum 0.9, a cosine lr decay stepped per epoch, and
   cross-entropy (mean over the batch, summed over heads). The heads share every
   mini-batch: their weights are held as one (D, L * C) matrix, so the forward and the
   weight gradient of all heads are one matmul each. Heads do not interact: head l sees
   exactly the updates it would get if trained alone with the same seed.
3. Report top-1 / top-5 of every head on the test features, and the best head.

Choosing the lr on the test split, as done here, is what most SSL papers report for
linear probes, but it is optimistic: the reported number is a max over L test scores.
Use held-out train features as ``test_*`` for an unbiased choice (:mod:`sslkit.eval.fewshot`
does so).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_EPOCHS = 100  # 12 s for 60000 x 256 features and 7 heads on 2 CPU cores
MOMENTUM = 0.9

# Test rows scored at a time: bounds the (rows, L * C) logits, e.g. 7 heads x 1000 classes.
_EVAL_CHUNK = 4096


def train_linear_probes(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    normalize: bool = True,
) -> dict:
    """Train one linear head per lr on ``train_feats``; score every head on ``test_feats``.

    Args:
        train_feats: (N, D) float features of the labelled train images.
        train_labels: (N,) int labels in [0, num_classes).
        test_feats: (Q, D) float features to score on.
        test_labels: (Q,) int labels.
        num_classes: C.
        lrs: one head per learning rate (the lr at epoch 0, before the cosine decay).
        epochs: passes over the train features.
        batch_size: mini-batch size; the last batch of an epoch may be smaller.
        weight_decay: L2 penalty on the weights (not the biases).
        seed: seeds the per-epoch shuffle.
        normalize: standardise the features with the train mean/std (module docstring).

    Returns:
        ``{"top1", "top5", "best_lr", "per_lr": {lr: {"top1", "top5"}}}``, fractions in
        [0, 1]; the best head is the one with the highest test top-1 (ties: the first lr),
        and ``top5`` is that head's.
    """
    if normalize:
        train_feats, test_feats = standardize(train_feats, train_feats, test_feats)
    weight, bias = fit_linear_heads(train_feats, train_labels, num_classes, lrs, epochs, batch_size, weight_decay, seed)
    top1, top5 = heads_accuracy(weight, bias, test_feats, test_labels)  # (L,), (L,)
    per_lr = {lr: {"top1": a, "top5": b} for lr, a, b in zip(lrs, top1.tolist(), top5.tolist())}
    best = int(top1.argmax())
    return {"top1": float(top1[best]), "top5": float(top5[best]), "best_lr": lrs[best], "per_lr": per_lr}


def standardize(reference: Tensor, *feats: Tensor) -> tuple[Tensor, ...]:
    """``feats`` shifted and scaled by the per-dimension mean and std of ``reference`` (N, D)
    (:func:`feature_stats`)."""
    mean, std = feature_stats(reference)  # (D,), (D,)
    return tuple((f.float() - mean.to(f.device)) / std.to(f.device) for f in feats)


def feature_stats(reference: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std (D,) of (N, D) features, in float32.

    The std is floored so that dimensions constant over ``reference`` (dead ReLU units) give
    0, not 0 / 0 = NaN, once standardised; a head then never learns a weight for them.
    """
    reference = reference.float()
    return reference.mean(0), reference.std(0).clamp_min(1e-6)


def topk_accuracy(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """Top-1 and top-5 (top-C with fewer classes) of (Q, C) logits or probabilities, as fractions."""
    hit = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels.view(-1, 1).to(scores.device)  # (Q, k)
    n = max(labels.shape[0], 1)
    return int(hit[:, 0].sum()) / n, int(hit.any(1).sum()) / n


def fit_linear_heads(
    feats: Tensor,
    labels: Tensor,
    num_classes: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Train L = len(lrs) softmax-regression heads at once (step 2 of the module docstring).

    Each step is torch.optim.SGD's (momentum 0.9, no dampening, no Nesterov) with head l's
    lr = lrs[l] * 0.5 * (1 + cos(pi * epoch / epochs)); the gradient is written out by hand
    (softmax - one-hot) because autograd and an optimiser per step cost more than the
    matmuls themselves at these sizes.

    Args:
        feats: (N, D) float features, already normalised as wanted.
        labels: (N,) int labels in [0, num_classes).
        Others: as in :func:`train_linear_probes`.

    Returns:
        weight (L, D, C) and bias (L, C), on the features' device; logits = x @ weight[l] + bias[l].
    """
    if feats.ndim != 2 or labels.shape != feats.shape[:1]:
        raise ValueError(f"feats must be (N, D) and labels (N,), got {tuple(feats.shape)} and {tuple(labels.shape)}")
    if not lrs:
        raise ValueError("lrs must name at least one learning rate")
    x = feats.float()  # (N, D)
    device = x.device
    n, d = x.shape
    heads, c = len(lrs), num_classes
    onehot = torch.nn.functional.one_hot(labels.long().to(device), c).float()  # (N, C)
    w = torch.zeros(d, heads * c, device=device)  # (D, L*C): column l*C + j is head l, class j
    b = torch.zeros(heads * c, device=device)  # (L*C,)
    mom_w, mom_b = torch.zeros_like(w), torch.zeros_like(b)
    head_lr = torch.tensor(list(lrs), dtype=torch.float32, device=device).repeat_interleave(c)  # (L*C,)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        lr = head_lr * (0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))  # (L*C,)
        for idx in torch.randperm(n, generator=generator).to(device).split(batch_size):
            xb = x.index_select(0, idx)  # (b, D); 3-5x faster than x[idx] on the CPU
            probs = _softmax(torch.addmm(b, xb, w).view(-1, heads, c))  # (b, L, C)
            # d(sum over heads of the mean CE)/d logits: each head's gradient is its own.
            grad = probs.sub_(onehot.index_select(0, idx).unsqueeze(1))  # (b, L, C)
            grad = grad.view(-1, heads * c).div_(idx.numel())  # (b, L*C)
            grad_w = xb.T @ grad  # (D, L*C)
            if weight_decay:
                grad_w.add_(w, alpha=weight_decay)
            mom_w.mul_(MOMENTUM).add_(grad_w)
            mom_b.mul_(MOMENTUM).add_(grad.sum(0))
            w.sub_(mom_w * lr)
            b.sub_(mom_b * lr)
    return w.view(d, heads, c).permute(1, 0, 2), b.view(heads, c)


def _softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dim of (b, L, C) logits, each head shifted by its own max.

    Written out because torch's CPU softmax over a short last dim (C = 10) took 3-5x longer
    than this, and more than the matmuls of the step.
    """
    e = (logits - logits.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


@torch.no_grad()
def heads_accuracy(weight: Tensor, bias: Tensor, feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-1 and top-5 accuracy (fractions) of every head: weight (L, D, C), bias (L, C) on feats (Q, D).

    Returns two (L,) float64 tensors on the CPU; with C < 5 classes top-5 is top-C (= 1).
    """
    heads, d, c = weight.shape
    w = weight.permute(1, 0, 2).reshape(d, heads * c)  # (D, L*C)
    b = bias.reshape(heads * c)  # (L*C,)
    k = min(5, c)
    hits1 = torch.zeros(heads, dtype=torch.long, device=weight.device)
    hits5 = torch.zeros_like(hits1)
    for xc, yc in zip(feats.float().split(_EVAL_CHUNK), labels.split(_EVAL_CHUNK)):
        logits = torch.addmm(b, xc.to(w.device), w).view(-1, heads, c)  # (q, L, C)
        hit = logits.topk(k, dim=-1).indices == yc.to(w.device).view(-1, 1, 1)  # (q, L, k)
        hits1 += hit[..., 0].sum(0)
        hits5 += hit.any(-1).sum(0)
    total = max(labels.shape[0], 1)
    return hits1.cpu().double() / total, hits5.cpu().double() / total
