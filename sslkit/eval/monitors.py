"""Representation-collapse monitors for a batch of embeddings (B, D).

Two failure modes, two measures:

- complete collapse (every image maps to nearly the same point): the per-dimension std of
  the L2-normalised embeddings, :func:`embedding_std`, drops from ~1/sqrt(D) towards 0
  (lightly's ``std_of_l2_normalized``; SimSiam, Chen & He 2021, Fig. 2);
- dimensional collapse (the embeddings vary, but only along a few directions): the
  effective rank, :func:`effective_rank` (Roy & Vetterli 2007), drops towards 1. It is
  scale-invariant, so it does not see complete collapse with a little noise left; the std does.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

_ADVICE = (
    "Try a lower learning rate, a larger loss temperature (contrastive methods), and check the "
    "augmentations: two views must differ (crops, colour jitter) or matching them is trivial."
)


@torch.no_grad()
def embedding_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std (over the batch) of L2-normalised ``z``.

    Args:
        z: (B, D) embeddings, B >= 2; any dtype (computed in float32).

    Returns:
        0-dim float32 tensor: ~1/sqrt(D) for embeddings spread over the sphere, 0 when collapsed.
    """
    _check_batch(z)
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(z: Tensor, eps: float = 1e-12, center: bool = True) -> Tensor:
    """exp(entropy of the normalised singular values) of the centred batch (Roy & Vetterli 2007).

    With singular values s of ``z - z.mean(0)`` and p = s / sum(s), the result is
    exp(-sum p log p): r for r equal non-zero singular values, in [1, min(B, D)] otherwise.

    Args:
        z: (B, D) embeddings, B >= 2; any dtype (computed in float32).
        eps: floor of sum(s), against division by zero.
        center: subtract the batch mean first (False: the singular values of ``z`` itself, RankMe's).

    Singular values at the level of float32 rounding noise count as zero.

    Returns:
        0-dim float32 tensor; 0 for a constant batch (the centred batch is zero, rank 0).
    """
    _check_batch(z)
    z = z.float()
    s = torch.linalg.svdvals(z - z.mean(dim=0) if center else z)  # (min(B, D),)
    # Centring a constant batch leaves float32 rounding noise whose spectrum would count as
    # rank; drop singular values below that noise (a bound on its norm, as matrix_rank does).
    noise = max(z.shape) * torch.finfo(torch.float32).eps * torch.linalg.vector_norm(z)
    s = torch.where(s > noise, s, torch.zeros_like(s))
    total = s.sum()
    p = s / total.clamp_min(eps)
    rank = torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy: 0 log 0 = 0
    return torch.where(total > 0, rank, torch.zeros_like(rank))


@torch.no_grad()
def rankme(z: Tensor) -> float:
    """RankMe of (N, D) embeddings (Garrido et al., "RankMe: Assessing the downstream performance of
    pretrained self-supervised representations by their rank", ICML 2023): the effective rank of
    the embeddings themselves, not centred. Label-free; higher tends to mean better downstream
    accuracy for one method across its hyper-parameters.

    The paper adds 1e-7 to each p_k against log 0; here 0 log 0 = 0 instead, and singular values
    at float32 noise level count as zero (:func:`effective_rank`), which differ from the paper's
    by less than min(N, D) x 1e-7 relative.
    """
    return float(effective_rank(z, center=False))


class CollapseMonitor:
    """Collapse measures of an embedding batch, with a warning when one falls below its threshold.

    Each kind (complete, dimensional) warns once, and again only after it has recovered
    above its threshold and fallen once more, so a long collapsed run does not flood the log.

    Args:
        std_ratio_warn: warn when :func:`embedding_std` * sqrt(D) (1 when healthy) is below it.
        rank_ratio_warn: warn when :func:`effective_rank` / min(B, D) is below it.
    """

    def __init__(self, std_ratio_warn: float = 0.1, rank_ratio_warn: float = 0.01) -> None:
        self.std_ratio_warn = std_ratio_warn
        self.rank_ratio_warn = rank_ratio_warn
        self._warned: set[str] = set()

    def __call__(self, z: Tensor) -> dict[str, float]:
        """``{"emb_std", "emb_std_ratio", "eff_rank", "eff_rank_ratio"}`` of a (B, D) batch."""
        b, d = z.shape
        std = float(embedding_std(z))
        rank = float(effective_rank(z))
        out = {
            "emb_std": std,
            "emb_std_ratio": std * math.sqrt(d),
            "eff_rank": rank,
            "eff_rank_ratio": rank / min(b, d),
        }
        self._check(
            "std", out["emb_std_ratio"] < self.std_ratio_warn,
            f"Embedding collapse: the per-dimension std of the L2-normalised embeddings is "
            f"{out['emb_std_ratio']:.3g} x 1/sqrt(D) (healthy ~1, warning below {self.std_ratio_warn}). "
            f"The network maps all images to nearly the same point and learns nothing about them.",
        )
        self._check(
            "rank", out["eff_rank_ratio"] < self.rank_ratio_warn,
            f"Dimensional collapse: the effective rank of the embeddings is {rank:.3g} of at most "
            f"{min(b, d)} (ratio {out['eff_rank_ratio']:.3g}, warning below {self.rank_ratio_warn}). "
            f"They vary along only a few directions, so most dimensions carry no information.",
        )
        return out

    def _check(self, kind: str, collapsed: bool, message: str) -> None:
        if not collapsed:
            self._warned.discard(kind)
        elif kind not in self._warned:
            self._warned.add(kind)
            # The message holds the measured value, so Python's once-per-location filter
            # does not swallow a warning for a later, separate collapse.
            warnings.warn(f"{message} {_ADVICE}", RuntimeWarning, stacklevel=3)


def _check_batch(z: Tensor) -> None:
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"embeddings must be a (B, D) batch with B >= 2, got {tuple(z.shape)}")
