"""The nested CSR format: one copy of a nested weight that serves every level (DESIGN section 5).

A nested weight ``W`` with level map ``LM`` is viewed in 2-D: rows are output channels, columns the
rest (for a conv flattened in ``(C/groups, KH, KW)`` order). Every stored weight (``LM >= 0``) is
kept once. Inside each row the stored weights are ordered by level descending (the sparsest level's
weights first, ties by column), so level ``l`` reads the prefix of the row made of the weights with
``LM >= l``; its length is ``level_len[l, row]``.

Kernel operands, in kernel parameter order (``NestedCSR.arrays()``):

=============  =========================  ==========================================================
``values``     float32 ``[nnz]``          the stored weights, row by row, each row level-descending
``col``        uint8/uint16/int32 ``[nnz]`` column of each stored weight (narrowest dtype for cols)
``row_ptr``    int32 ``[rows + 1]``       row ``r`` owns ``values[row_ptr[r]:row_ptr[r + 1]]``
``level_len``  uint8/uint16/int32 ``[L, rows]``  entries of row r kept at level l
=============  =========================  ==========================================================

``nnz`` is the number of stored weights; when it is 0, ``values`` and ``col`` hold one dummy entry
(zero-size buffers are awkward in TVM) that no level ever reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract import FORMAT_VERSION, MAX_LEVELS


def _index_dtype(max_value: int) -> np.dtype:
    """The narrowest unsigned (or int32) dtype that holds every value in ``0..max_value``."""
    if max_value <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_value <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_value <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise ValueError(f"index value {max_value} does not fit in int32")


def check_level_values(level_map, where: str = "level map") -> None:
    """Refuse, naming ``where`` (the layer), a level map that is not integer or holds a value outside
    ``-1..MAX_LEVELS-1``. Checked in the map's own dtype, before any cast: an int64 map holding 2**32
    would become 0 in int32, and 2**31 + 2 a negative level."""
    lm = np.asarray(level_map)
    if lm.dtype.kind not in "iu":
        raise ValueError(f"{where}: level map must be an integer array, got dtype {lm.dtype}")
    if not lm.size:
        return
    low, high = lm.min(), lm.max()  # exact in the array's own integer dtype
    for value in (low, high):
        if not -1 <= int(value) < MAX_LEVELS:
            raise ValueError(
                f"{where}: level map holds {int(value)} ({lm.dtype}); values must be -1 (pruned) or a level "
                f"0..{MAX_LEVELS - 1} (a model has at most {MAX_LEVELS} levels)"
            )


def _check_level_map(level_map2d, shape: tuple[int, ...], num_levels: int | None) -> np.ndarray:
    lm = np.asarray(level_map2d)
    check_level_values(lm)
    if lm.ndim != 2:
        raise ValueError(f"level map must be 2-D (rows, cols), got shape {lm.shape}")
    if tuple(lm.shape) != tuple(shape):
        raise ValueError(f"level map shape {lm.shape} differs from weight shape {tuple(shape)}")
    if num_levels is not None and lm.size and int(lm.max()) >= num_levels:
        raise ValueError(f"level map holds level {int(lm.max())} >= num_levels={num_levels}")
    return lm.astype(np.int64)


def csr_nbytes(level_map2d) -> int:
    """Bytes of a plain CSR of level 0 (fp32 values, int32 columns, int32 row pointers).

    This is the storage yardstick of DESIGN section 5.
    """
    lm = _check_level_map(level_map2d, np.shape(level_map2d), None)
    nnz = int((lm >= 0).sum())
    return 4 * nnz + 4 * nnz + 4 * (lm.shape[0] + 1)


@dataclass(frozen=True, eq=False)
class NestedCSR:
    """One nested weight, packed once for every level (see the module docstring for the layout)."""

    rows: int
    cols: int
    num_levels: int
    values: np.ndarray  # float32 [max(nnz, 1)]
    col: np.ndarray  # uint8 | uint16 | int32 [max(nnz, 1)]
    row_ptr: np.ndarray  # int32 [rows + 1]
    level_len: np.ndarray  # uint8 | uint16 | int32 [num_levels, rows]
    by_column: bool = True  # col holds columns (False: a kernel's own index, see ``pack(index=)``)

    # ------------------------------------------------------------------ construction
    @classmethod
    def pack(cls, weight2d, level_map2d, num_levels: int, *, index=None) -> NestedCSR:
        """Pack ``weight2d`` (float32 ``[rows, cols]``) under ``level_map2d`` for ``num_levels``.

        ``num_levels`` is the model's L; it may exceed ``1 + max(level_map2d)`` (the levels above
        this layer's own maximum are then all-pruned for it). ``index``: an integer array of the
        weight's shape whose entry is stored as the index of each kept weight instead of its column
        (a kernel's own addressing, e.g. the input offset a conv weight reads); such a format is an
        operand of that kernel only (``unpack`` and ``level_map`` need columns).
        """
        if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)):
            raise ValueError(f"num_levels must be an int, got {num_levels!r}")
        num_levels = int(num_levels)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        w = np.asarray(weight2d)
        if w.ndim != 2:
            raise ValueError(f"weight must be 2-D (rows, cols), got shape {w.shape}")
        if w.dtype.kind not in "fiu":
            raise ValueError(f"weight must be a real numeric array, got dtype {w.dtype}")
        rows, cols = (int(s) for s in w.shape)
        if rows == 0 or cols == 0:
            raise ValueError(f"weight shape {w.shape} has a zero dimension")
        lm = _check_level_map(level_map2d, w.shape, num_levels)
        w = w.astype(np.float32)

        kept = lm >= 0
        # Order of the stored weights: row ascending, then level descending, then column ascending.
        r_idx, c_idx = np.nonzero(kept)  # row-major: rows ascending, cols ascending
        order = np.lexsort((c_idx, -lm[r_idx, c_idx], r_idx))
        r_idx, c_idx = r_idx[order], c_idx[order]
        nnz = int(r_idx.size)

        counts = np.zeros((num_levels, rows), dtype=np.int64)
        for lvl in range(num_levels):
            counts[lvl] = (lm >= lvl).sum(axis=1)
        row_ptr = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(counts[0], out=row_ptr[1:])
        if row_ptr[-1] > np.iinfo(np.int32).max:
            raise ValueError(f"{int(row_ptr[-1])} stored weights do not fit int32 row pointers")

        if index is None:
            entries, top = c_idx, cols - 1
        else:
            index = np.asarray(index)
            if index.shape != w.shape or index.dtype.kind not in "iu":
                raise ValueError(f"index must be an integer array of the weight's shape {w.shape}")
            entries = index[r_idx, c_idx]
            top = int(index.max(initial=0))
            if entries.size and int(entries.min()) < 0:
                raise ValueError("index entries must be >= 0")
        if nnz:
            values = w[r_idx, c_idx].astype(np.float32)
            col = entries.astype(_index_dtype(top))
        else:
            values = np.zeros(1, np.float32)
            col = np.zeros(1, _index_dtype(top))
        level_len = counts.astype(_index_dtype(int(counts.max()) if counts.size else 0))
        fmt = cls._make(rows, cols, num_levels, values, col, row_ptr.astype(np.int32), level_len)
        if index is not None:
            object.__setattr__(fmt, "by_column", False)
        return fmt

    @classmethod
    def from_arrays(cls, cols: int, arrays) -> NestedCSR:
        """A format from its operands (``arrays()`` order), e.g. the constants of a kernel call."""
        values, col, row_ptr, level_len = (np.asarray(a) for a in arrays)
        num_levels, rows = level_len.shape
        if row_ptr.shape != (rows + 1,) or values.shape != col.shape:
            raise ValueError(
                f"inconsistent operands: row_ptr {row_ptr.shape}, level_len {level_len.shape}, "
                f"values {values.shape}, col {col.shape}"
            )
        return cls._make(rows, cols, num_levels, values, col, row_ptr, level_len)

    @classmethod
    def _make(cls, rows, cols, num_levels, values, col, row_ptr, level_len) -> NestedCSR:
        arrays = []
        for a in (values, col, row_ptr, level_len):
            a = np.ascontiguousarray(a)
            a.flags.writeable = False
            arrays.append(a)
        return cls(int(rows), int(cols), int(num_levels), *arrays)

    # ------------------------------------------------------------------ the operands
    def arrays(self) -> list[np.ndarray]:
        """The kernel operands in kernel parameter order: values, col, row_ptr, level_len."""
        return [self.values, self.col, self.row_ptr, self.level_len]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        """The exported payload: every operand array, dummies included."""
        return int(sum(a.nbytes for a in self.arrays()))

    def nnz(self, level: int = 0) -> int:
        """Stored weights kept at ``level`` (0 for a level at or above num_levels)."""
        level = self._check_level(level)
        if level >= self.num_levels:
            return 0
        return int(self.level_len[level].astype(np.int64).sum())

    def density(self, level: int = 0) -> float:
        return self.nnz(level) / float(self.rows * self.cols)

    def unpack(self, level: int = 0) -> np.ndarray:
        """The dense effective weight of ``level``: ``weight2d * (level_map2d >= level)``."""
        self._check_columns()
        level = self._check_level(level)
        out = np.zeros((self.rows, self.cols), np.float32)
        if level >= self.num_levels:
            return out
        start = self.row_ptr[:-1].astype(np.int64)
        length = self.level_len[level].astype(np.int64)
        row = np.repeat(np.arange(self.rows), length)
        # position of every kept entry: start of its row + offset inside the row's prefix
        offset = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
        pos = np.repeat(start, length) + offset
        out[row, self.col[pos].astype(np.int64)] = self.values[pos]
        return out

    def level_map(self) -> np.ndarray:
        """The level map this format was packed from (int32 ``[rows, cols]``)."""
        lm = np.full((self.rows, self.cols), -1, np.int32)
        for lvl in range(self.num_levels):
            lvl_mask = self.unpack_mask(lvl)
            lm[lvl_mask] = lvl
        return lm

    def unpack_mask(self, level: int = 0) -> np.ndarray:
        """Boolean keep-mask of ``level`` (from the stored positions, not from the values)."""
        self._check_columns()
        level = self._check_level(level)
        mask = np.zeros((self.rows, self.cols), bool)
        if level >= self.num_levels:
            return mask
        for r in range(self.rows):
            s = int(self.row_ptr[r])
            mask[r, self.col[s : s + int(self.level_len[level, r])].astype(np.int64)] = True
        return mask

    def _check_columns(self) -> None:
        if not self.by_column:
            raise ValueError("this NestedCSR stores a kernel's own index, not columns: it cannot be unpacked")

    @staticmethod
    def _check_level(level) -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise ValueError(f"level must be an int, got {level!r}")
        if level < 0:
            raise ValueError(f"level must be >= 0, got {int(level)}")
        return int(level)

    def __repr__(self) -> str:
        dens = ", ".join(f"{self.density(lvl):.3f}" for lvl in range(self.num_levels))
        return (
            f"NestedCSR({self.rows}x{self.cols}, L={self.num_levels}, "
            f"density per level [{dens}], "
            f"col {self.col.dtype}, level_len {self.level_len.dtype}, {self.nbytes} B)"
        )


__all__ = ["FORMAT_VERSION", "NestedCSR", "csr_nbytes"]
