"""Random-effects terms: one ``(lhs | group)`` after expansion.

A :class:`ReTerm` holds what the algorithms need of one term, and nothing is
re-derived downstream:

* ``refs`` – the level index of each observation (``int32``, length n),
* ``z`` – the term's own model matrix, n × k (columns ``cnames``),
* the map θ_k → T_k (k × k lower triangular, column-major θ order, as lme4),
* ``Z()`` – its n × (nlev·k) block of Z as the Khatri–Rao (row-wise Kronecker)
  product of the indicator of ``refs`` with ``z``, level-major within the term.

Λ(θ) restricted to the term is ``I_nlev ⊗ T_k(θ_k)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

__all__ = ["ReTerm"]


@dataclass
class ReTerm:
    """One random-effects term.

    Attributes
    ----------
    group : str
        Grouping-factor name as lme4 prints it (``"Subject"``, ``"cask:batch"``).
    lhs : str
        The term's formula (``"1 + Days"``).
    cnames : list of str
        Column names of the term's model matrix (``["(Intercept)", "Days"]``).
    levels : numpy.ndarray
        Level labels of the grouping factor (strings), in the order of ``Z``'s columns.
    refs : numpy.ndarray
        ``int32`` level index of each observation.
    z : numpy.ndarray
        n × k model matrix of the term.
    text : str
        The bar term as written in the formula.
    """

    group: str
    lhs: str
    cnames: list[str]
    levels: np.ndarray
    refs: np.ndarray
    z: np.ndarray
    text: str = ""
    _rows: np.ndarray = field(init=False, repr=False)
    _cols: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        k = self.k
        self._rows, self._cols = (a.astype(np.intp) for a in _tril_colmajor(k))

    # -- sizes ------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of random effects per level (columns of ``z``)."""
        return self.z.shape[1]

    @property
    def nlev(self) -> int:
        """Number of levels of the grouping factor."""
        return len(self.levels)

    @property
    def q(self) -> int:
        """Number of random effects of the term (``nlev * k``)."""
        return self.nlev * self.k

    @property
    def is_scalar(self) -> bool:
        """One random effect per level (k = 1)."""
        return self.k == 1

    @property
    def ntheta(self) -> int:
        """Number of θ components of the term, k(k+1)/2."""
        return self.k * (self.k + 1) // 2

    # -- θ -----------------------------------------------------------------------------------
    @property
    def theta_names(self) -> list[str]:
        """lme4's names: ``g.a`` on the diagonal, ``g.b.a`` for the (b, a) off-diagonal."""
        c = self.cnames
        return [
            f"{self.group}.{c[i]}" if i == j else f"{self.group}.{c[i]}.{c[j]}"
            for i, j in zip(self._rows, self._cols)
        ]

    @property
    def theta_start(self) -> np.ndarray:
        """lme4's start for the term's θ: 1 on the diagonal, 0 off it."""
        return (self._rows == self._cols).astype(float)

    @property
    def theta_lower(self) -> np.ndarray:
        """Lower bounds of the term's θ: 0 on the diagonal, −inf off it."""
        return np.where(self._rows == self._cols, 0.0, -np.inf)

    @property
    def tril(self) -> list[tuple[int, int]]:
        """(row, col) of each θ component of the term within T_k, in lme4's column-major order."""
        return list(zip(self._rows.tolist(), self._cols.tolist()))

    @property
    def diag_index(self) -> np.ndarray:
        """Positions of the diagonal elements within this term's θ."""
        return np.flatnonzero(self._rows == self._cols)

    def T(self, theta_k: np.ndarray) -> np.ndarray:
        """T(theta_k) -> ndarray (k, k)

        Lower-triangular relative covariance factor filled column-major from θ_k.
        """
        t = np.zeros((self.k, self.k))
        t[self._rows, self._cols] = theta_k
        return t

    # -- Z -----------------------------------------------------------------------------------
    def Z(self) -> sp.csc_matrix:
        """Z() -> scipy.sparse.csc_matrix (n, nlev*k)

        Column ``l*k + j`` holds ``z[:, j]`` on the rows of level ``l``.
        """
        n, k = self.z.shape
        rows = np.repeat(np.arange(n), k)
        cols = (self.refs[:, None].astype(np.int64) * k + np.arange(k)).ravel()
        return sp.csc_matrix((self.z.ravel(), (rows, cols)), shape=(n, self.q))

    def __repr__(self) -> str:
        return f"ReTerm({self.text or self.lhs + ' | ' + self.group}: {self.nlev} levels x {self.k} effects)"


def _tril_colmajor(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a k×k lower triangle in column-major order."""
    rows, cols = [], []
    for j in range(k):
        for i in range(j, k):
            rows.append(i)
            cols.append(j)
    return np.array(rows, dtype=int), np.array(cols, dtype=int)
