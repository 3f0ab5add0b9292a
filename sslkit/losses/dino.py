"""DINO's self-distillation loss with a centred, sharpened teacher.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021,
https://arxiv.org/abs/2104.14294.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import all_reduce_mean
from sslkit.errors import ArgumentError
from sslkit.losses.sinkhorn_knopp import sinkhorn_knopp_teacher


def teacher_temperature(epoch: float, teacher_temp: float, warmup_temp: float, warmup_epochs: float) -> float:
    """DINO's teacher temperature: linear from ``warmup_temp`` to ``teacher_temp`` over
    ``warmup_epochs`` (fractional epochs allowed), then constant."""
    if epoch >= warmup_epochs:
        return teacher_temp
    return warmup_temp + (teacher_temp - warmup_temp) * epoch / warmup_epochs


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax over ``output_dim``
    prototypes and the student's softmax, for every pair of a teacher view (the global crops)
    and a different student view (global and local crops).

    lightly's arguments and call (compared with lightly's class in ``tests/test_lightly_compat.py``).
    Each call also moves the centre towards the mean of the teacher's outputs,
    ``center = m * center + (1 - m) * mean``; that mean is all-reduced over processes
    (``sslkit.distributed.all_reduce_mean``), so every process keeps the same centre as one
    process with the whole batch (``tests/test_distributed.py`` checks it).

    The teacher's temperature: ``teacher_temp`` passed to the call (sslkit's DINO passes its
    per-step schedule, ``teacher_temperature``), else lightly's warm-up by ``epoch`` (the original
    code's ``linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)``, then
    ``teacher_temp``), else the constructor's ``teacher_temp``. A float temperature is used as a
    number (lightly makes a CPU tensor of it every call).

    Args:
        output_dim: the number of prototypes K of the DINO head (65536 in the paper).
        warmup_teacher_temp: the teacher's temperature at epoch 0 of the warm-up (0.04).
        teacher_temp: the teacher's temperature after the warm-up (0.04; 0.07 in DINO's ViT runs).
        warmup_teacher_temp_epochs: the warm-up's length in epochs (30).
        student_temp: the student's softmax temperature (0.1).
        center_momentum: the centre's EMA momentum (0.9).
        center_mode: ``"mean"`` (DINO's centre, lightly's only mode) or ``"sinkhorn_knopp"``
            (DINOv2's option: the teacher's probabilities from ``sinkhorn_knopp_teacher`` over all
            teacher views of the global batch; the centre is then neither used nor updated).

    Shapes:
        teacher_out: list of T tensors (N, K), the teacher's outputs of the global views.
        student_out: list of S tensors (N, K), the student's outputs of all views, in the same
            order (views with the same index as a teacher view are not compared).
        returns: scalar, the mean over the T x S - T pairs and the N samples.

    Raises:
        ArgumentError (a ValueError): an unknown ``center_mode``; a call with fewer than two views
            in all (no pair to compare).

    Examples:
        >>> import torch
        >>> from sslkit.losses import DINOLoss
        >>> loss_fn = DINOLoss(output_dim=32)
        >>> teacher = [torch.randn(4, 32) for _ in range(2)]
        >>> student = [torch.randn(4, 32) for _ in range(4)]  # 2 global + 2 local views
        >>> loss_fn(teacher, student, teacher_temp=0.04).shape
        torch.Size([])
    """

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_mode: str = "mean",
    ) -> None:
        super().__init__()
        if center_mode not in ("mean", "sinkhorn_knopp"):
            raise ArgumentError(f"DINOLoss center_mode must be 'mean' or 'sinkhorn_knopp', got {center_mode!r}")
        self.center_mode = center_mode
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.center: Tensor
        self.register_buffer("center", torch.zeros(1, 1, output_dim))

    def forward(
        self,
        teacher_out: list[Tensor],
        student_out: list[Tensor],
        teacher_temp: Optional[float] = None,
        epoch: Optional[int] = None,
    ) -> Tensor:
        if len(teacher_out) * len(student_out) - min(len(teacher_out), len(student_out)) == 0:
            raise ArgumentError(
                f"DINOLoss needs at least two views in all to compare different views, got {len(teacher_out)} teacher "
                f"and {len(student_out)} student view(s): pass the teacher's global views and the student's views"
            )
        if teacher_temp is None:
            warming = epoch is not None and epoch < self.warmup_teacher_temp_epochs
            teacher_temp = float(self.teacher_temp_schedule[epoch]) if warming else self.teacher_temp
        teacher = torch.stack(teacher_out)  # (T, N, K)
        if self.center_mode == "sinkhorn_knopp":
            t = sinkhorn_knopp_teacher(teacher.flatten(0, 1), teacher_temp).view(teacher.shape)  # (T, N, K)
        else:
            t = F.softmax((teacher - self.center) / teacher_temp, dim=-1)  # (T, N, K)
        s = F.log_softmax(torch.stack(student_out) / self.student_temp, dim=-1)  # (S, N, K)
        loss = -torch.einsum("tnk,snk->ts", t, s)  # (T, S): summed over the N samples
        loss = loss.fill_diagonal_(0).sum()  # a view is not compared with itself
        pairs = len(teacher_out) * len(student_out) - min(len(teacher_out), len(student_out))
        if self.center_mode == "mean":
            self.update_center(teacher)
        return loss / (pairs * teacher.shape[1])

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """``center = m * center + (1 - m) * mean``, the mean over every row of ``teacher_out``
        (T, N, K) or (N, K) and over every process."""
        batch_center = all_reduce_mean(teacher_out.reshape(-1, teacher_out.shape[-1]).mean(0).float())  # (K,)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
