"""Validation of a distillation run: verification pairs of held-out points of a distillation
pool, scored for the student against the teacher's cached descriptors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .evaluation import fpr_at_recall
from .teacherpool import TeacherPool


def _distances(desc: np.ndarray, idx0: np.ndarray, idx1: np.ndarray) -> np.ndarray:
    return np.asarray(np.linalg.norm(desc[idx0] - desc[idx1], axis=1))


@dataclass
class DistillValSet:
    """Verification pairs over view rows of the held-out points. Shape: patches (M,P,P) uint8
    and teacher (M,D) float32, the rows' views and cached descriptors; idx0, idx1 (L,) into
    the rows; is_match (L,) bool; teacher_fpr95 a float."""

    patches: np.ndarray
    teacher: np.ndarray
    idx0: np.ndarray
    idx1: np.ndarray
    is_match: np.ndarray
    teacher_fpr95: float

    @classmethod
    def of(cls, pool: TeacherPool, n: int, seed: int) -> DistillValSet:
        """Each of ``n`` chosen points gives its matching pair and a negative: its anchor with
        the second view of the next chosen point (points sorted, so mostly of the same
        image: hard)."""
        rng = np.random.default_rng([seed, 31])
        n = min(n, pool.num_points)
        if n < 2:
            raise ConfigError(f"{pool.name}: validation needs at least 2 held-out points")
        pts = np.sort(rng.choice(pool.num_points, n, replace=False))
        rows = pool.gather_rows(pts, rng)  # (n,2)
        a = np.arange(n) * 2
        idx0 = np.concatenate([a, a])
        idx1 = np.concatenate([a + 1, np.roll(a, -1) + 1])
        is_match = np.r_[np.ones(n, bool), np.zeros(n, bool)]
        teacher = np.asarray(pool.teacher[rows.reshape(-1)], np.float32)
        t_fpr = fpr_at_recall(_distances(teacher, idx0, idx1), is_match, 0.95)
        return cls(pool.read(rows.reshape(-1)), teacher, idx0, idx1, is_match, t_fpr)

    def scores(self, desc: np.ndarray) -> dict[str, float]:
        """The student's FPR95 on the pairs, the teacher's, and the mean cosine of the
        student's descriptors to the teacher's. Shape: desc (M,D) unit rows."""
        return {
            "fpr95": fpr_at_recall(_distances(desc, self.idx0, self.idx1), self.is_match, 0.95),
            "teacher_fpr95": self.teacher_fpr95,
            "val_cos": float((desc * self.teacher).sum(1).mean()),
        }
