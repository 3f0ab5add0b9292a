"""iBOT's patch-level self-distillation loss (masked image modelling with an online tokenizer).

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022,
https://arxiv.org/abs/2111.07832; as DINOv2 uses it (``dinov2/loss/ibot_patch_loss.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import all_reduce_sum
from sslkit.errors import ArgumentError
from sslkit.losses.sinkhorn_knopp import sinkhorn_knopp_teacher

CENTER_MODES = ("mean", "sinkhorn_knopp")


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax and the student's softmax
    over ``output_dim`` prototypes, for the patch tokens the student saw masked; each image's
    masked patches weigh ``1 / (its number of masked patches)`` and the sum is divided by the
    number of images, so every masked image counts once.

    lightly's ``IBOTPatchLoss`` constructor, call and defaults (and its value, tested), with two
    additions:

    - ``center_mode="sinkhorn_knopp"``: DINOv2's alternative to the centre, the teacher's
      probabilities from ``sinkhorn_knopp_teacher`` over the masked patches of the global batch
      (the centre is then not used);
    - ``index``: the rows of ``teacher_out``/``student_out`` are the flat positions ``index``
      into ``mask`` (``b * H * W + h * W + w``), padding included: rows at unmasked positions
      weigh 0. Without it they are the masked positions in order (``mask.nonzero()``, a host
      sync on GPUs); a fixed-length ``index`` keeps the step free of host syncs.

    The centre moves towards the mean of the teacher's masked rows, ``center = m * center +
    (1 - m) * mean``, the mean taken over every process's masked rows.

    Args:
        output_dim: the number of prototypes K (65536 in DINOv2).
        teacher_temp: the teacher's temperature when the call gives none (0.04).
        student_temp: the student's temperature (0.1).
        center_mode: ``mean`` (iBOT's centre) or ``sinkhorn_knopp`` (DINOv2's option).
        center_momentum: the centre's EMA momentum (0.9).

    Shapes:
        teacher_out, student_out: (M, K) logits of the teacher and student at the same patches.
        mask: (B, H, W) bool, True where the student's patch was masked.
        index: (M,) long flat positions into ``mask``, or None (then M = mask.sum()).
        returns: scalar.

    Examples:
        >>> import torch
        >>> from sslkit.losses import IBOTPatchLoss
        >>> mask = torch.zeros(2, 4, 4, dtype=torch.bool)
        >>> mask[:, :2, :2] = True  # 4 masked patches per image
        >>> loss_fn = IBOTPatchLoss(output_dim=32)
        >>> loss_fn(torch.randn(8, 32), torch.randn(8, 32), mask).shape
        torch.Size([])
    """

    def __init__(
        self,
        output_dim: int = 65536,
        teacher_temp: float = 0.04,
        student_temp: float = 0.1,
        center_mode: str = "mean",
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if center_mode not in CENTER_MODES:
            raise ArgumentError(f"IBOTPatchLoss center_mode must be one of {list(CENTER_MODES)}, got {center_mode!r}")
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_mode = center_mode
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, output_dim))

    def forward(
        self,
        teacher_out: Tensor,
        student_out: Tensor,
        mask: Tensor,
        teacher_temp: Optional[float] = None,
        index: Optional[Tensor] = None,
    ) -> Tensor:
        temp = self.teacher_temp if teacher_temp is None else teacher_temp
        flat = mask.flatten()  # (B * H * W,)
        if index is None:
            index = flat.nonzero().flatten()
        valid = flat[index].to(teacher_out.dtype)  # (M,) 1 at masked positions, 0 at padding
        per_image = mask.flatten(1).sum(1).clamp(min=1)  # (B,)
        weight = valid / per_image[index // mask[0].numel()]  # (M,)
        if self.center_mode == "sinkhorn_knopp":
            teacher_probs = sinkhorn_knopp_teacher(teacher_out, temp, valid=valid)
        else:
            teacher_probs = F.softmax((teacher_out - self.center) / temp, dim=-1)
        loss = -(teacher_probs * F.log_softmax(student_out / self.student_temp, dim=-1)).sum(-1)  # (M,)
        loss = (loss * weight).sum() / len(mask)
        if self.center_mode == "mean":
            self.update_center(teacher_out, valid)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor, valid: Tensor) -> None:
        """teacher_out (M, K), valid (M,): the centre moves towards the mean of the valid rows
        of the global batch."""
        stats = torch.cat([(teacher_out * valid[:, None]).sum(0), valid.sum()[None]])  # (K + 1,)
        stats = all_reduce_sum(stats.float())
        mean = stats[:-1] / stats[-1].clamp(min=1)
        self.center.mul_(self.center_momentum).add_(mean[None].to(self.center.dtype), alpha=1 - self.center_momentum)
