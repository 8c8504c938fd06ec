"""A distillation pool opened for training (:mod:`.distillpool` builds them): the student's
views and the teacher's cached descriptors, served as pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .pool import VIEW_OFFSETS_FILE, VIEWS_FILE, MultiviewPairPool, load_array, read_meta

DISTILL_FORMAT = "descmatch-distillpool"
TEACHER_FILE = "teacher.npy"


class TeacherPool(MultiviewPairPool):
    """A distillation pool served as pairs: point k's anchor view and another of its views
    drawn at random, with the teacher's descriptors of both.

    Shape: ``gather_rows(points, rng)`` (B,) -> (B,2) view rows; ``gather`` -> (B,2,P,P) uint8;
    ``teacher`` (M,D) float16."""

    kind = "distill"

    def __init__(
        self,
        views: np.ndarray,
        view_offsets: np.ndarray,
        teacher: np.ndarray,
        group_offsets: np.ndarray | None,
        meta: dict[str, Any] | None = None,
        name: str = "distill",
    ) -> None:
        super().__init__(views, view_offsets, group_offsets, meta, name)
        if teacher.ndim != 2 or len(teacher) != len(views):
            raise ValueError(f"teacher must be (M,D) with M = {len(views)}, got {teacher.shape}")
        self.teacher = teacher

    @classmethod
    def load(cls, path: str | Path) -> TeacherPool:
        """Open a distillation pool folder (memory-mapped, read-only)."""
        path = Path(path)
        if not (path / "meta.json").is_file() or not (path / TEACHER_FILE).is_file():
            raise InputError(f"{path}: not a distillation pool (no meta.json and {TEACHER_FILE})")
        meta = read_meta(path)
        if meta.get("format") != DISTILL_FORMAT:
            raise InputError(f"{path}: not a {DISTILL_FORMAT} folder")
        src = Path(meta["base"]) if meta.get("kind") == "multiview" else path
        views = load_array(src / VIEWS_FILE)
        offsets = np.asarray(load_array(src / VIEW_OFFSETS_FILE, mmap=False), np.int64)
        teacher = load_array(path / TEACHER_FILE)
        try:
            return cls(
                views, offsets, teacher, np.asarray(meta["offsets"], np.int64), meta, str(path)
            )
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None

    def gather_rows(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rows = self.point_rows[np.asarray(points, np.int64)]
        start = self.view_offsets[rows]
        count = self.view_offsets[rows + 1] - start
        return np.stack([start, start + 1 + rng.integers(0, count - 1)], 1)

    def gather(self, points: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        rows = self.gather_rows(points, rng if rng is not None else np.random.default_rng())
        return self.read(rows)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Views by row (read in sorted order). Shape: (...,) -> (...,P,P) uint8."""
        flat = rows.reshape(-1)
        order = np.argsort(flat, kind="stable")
        out = np.empty((len(flat), *self.views.shape[1:]), np.uint8)
        out[order] = self.views[flat[order]]
        return out.reshape(*rows.shape, *self.views.shape[1:])
