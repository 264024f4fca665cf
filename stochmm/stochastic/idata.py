"""ArviZ objects on both ArviZ generations: ``InferenceData`` (ArviZ 0.23, Python 3.11) and xarray's
``DataTree`` (ArviZ ≥ 1.0, Python ≥ 3.12). Everything else in the package reads groups through
:func:`group_dataset`, so it works on either.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ARVIZ_1", "make_idata", "group_dataset", "group_names"]


def _major() -> int:
    import arviz as az

    return int(str(az.__version__).split(".")[0])


ARVIZ_1 = None  # resolved on first use (importing arviz is slow)


def is_arviz_1() -> bool:
    """True on ArviZ ≥ 1.0 (DataTree-based)."""
    global ARVIZ_1
    if ARVIZ_1 is None:
        ARVIZ_1 = _major() >= 1
    return ARVIZ_1


def make_idata(groups: dict[str, dict[str, np.ndarray]], *, coords: dict[str, Any], dims: dict[str, list[str]],
               attrs: dict[str, Any] | None = None) -> Any:
    """make_idata(groups, *, coords, dims, attrs=None) -> InferenceData or DataTree

    Build ArviZ's container from ``{group: {variable: array}}``; arrays of sampled groups are
    (chain, draw, ...), ``observed_data`` arrays are not.
    """
    import arviz as az

    groups = {g: v for g, v in groups.items() if v}
    if is_arviz_1():
        return az.from_dict(groups, coords=coords, dims=dims, attrs=attrs)
    return az.from_dict(**groups, coords=coords, dims=dims, attrs=attrs)


def _is_tree(idata: Any) -> bool:
    import xarray as xr

    tree = getattr(xr, "DataTree", None)
    return tree is not None and isinstance(idata, tree)


def group_names(idata: Any) -> list[str]:
    """Groups present in ``idata``."""
    if _is_tree(idata):
        return [str(k) for k in idata.children]
    return list(idata.groups())


def group_dataset(idata: Any, name: str) -> Any:
    """group_dataset(idata, name) -> xarray.Dataset — one group of either container; KeyError if absent."""
    if _is_tree(idata):
        if name not in idata.children:
            raise KeyError(name)
        return idata[name].to_dataset()
    if name not in idata.groups():
        raise KeyError(name)
    return getattr(idata, name)


def add_group(idata: Any, name: str, data: dict[str, np.ndarray], *, coords: dict[str, Any],
              dims: dict[str, list[str]]) -> Any:
    """add_group(idata, name, data, *, coords, dims) -> the container with one more group."""
    other = make_idata({name: data}, coords=coords, dims=dims)
    if is_arviz_1():
        idata[name] = other[name]
        return idata
    idata.extend(other)
    return idata
