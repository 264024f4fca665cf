"""The catalogue of reference models (``models/*.toml``) and checking fits against it.

Each TOML file describes one model — dataset, formula, family, method, and
optionally ``weights``/``offset`` (column names) and an ``[options]`` table passed to
``fit`` — with reference values and where they came from
(``source = "lme4 1.1-31, REML"``).
:func:`validate` fits every entry and tabulates ours against the reference;
``stochmm validate`` prints that table.

A fit passes when its objective is within ``objective_abs`` of the reference
**or lower** (a better optimum than lme4's is a pass), and fixed effects, θ and
standard errors are within their tolerances.
"""

from __future__ import annotations

import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import datasets
from .builder.model import Model

__all__ = ["CatalogueEntry", "load_catalogue", "fit_entry", "compare", "validate", "to_toml"]

DEFAULT_TOLERANCE = {"objective_abs": 1e-3, "fixef_rel": 1e-4, "fixef_abs": 0.0, "theta_abs": 1e-3,
                     "theta_rel": None, "se_rel": 1e-3, "sigma_rel": 1e-3}


@dataclass
class CatalogueEntry:
    """One reference model (a parsed ``models/<id>.toml``)."""

    id: str
    dataset: str
    formula: str
    family: str
    method: str
    source: str
    reference: dict[str, Any]
    nagq: int = 1
    link: str | None = None
    description: str = ""
    tolerance: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    offset: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def tol(self) -> dict[str, Any]:
        return {**DEFAULT_TOLERANCE, **self.tolerance}


def default_dir() -> Path:
    """The catalogue: ``models/`` of the current folder, else of the source checkout the package
    runs from, else the copy installed with the package (``stochmm/models``)."""
    here = Path(__file__).resolve().parent
    for cand in (Path.cwd() / "models", here.parent / "models", here / "models"):
        if cand.is_dir() and any(cand.glob("*.toml")):
            return cand
    raise FileNotFoundError("no models/ catalogue found (neither ./models, the source checkout's models/ nor "
                            "the installed stochmm/models); pass its directory explicitly")


def load_catalogue(directory: str | Path | None = None) -> list[CatalogueEntry]:
    """load_catalogue(directory=None) -> list of CatalogueEntry

    Read every ``*.toml`` in ``directory`` (default: the repository's ``models/``).
    """
    d = Path(directory) if directory is not None else default_dir()
    out = []
    for p in sorted(d.glob("*.toml")):
        raw = tomllib.loads(p.read_text())
        out.append(CatalogueEntry(
            id=raw["id"], dataset=raw["dataset"], formula=raw["formula"], family=raw.get("family", "gaussian"),
            method=raw.get("method", "REML"), source=raw["source"], reference=raw["reference"],
            nagq=int(raw.get("nagq", 1)), link=raw.get("link"), description=raw.get("description", ""),
            tolerance=raw.get("tolerance", {}), weights=raw.get("weights"), offset=raw.get("offset"),
            options=raw.get("options", {}), path=p))
    return out


def fit_entry(entry: CatalogueEntry):
    """fit_entry(entry) -> results: fit one catalogue model as its entry says."""
    data = datasets.load(entry.dataset)
    family: Any = None if entry.family == "gaussian" else entry.family
    if entry.family != "gaussian" and entry.link:
        from .builder.families import get_family  # GLMM path

        family = get_family(entry.family, entry.link)
    model = Model(entry.formula, data, family=family, weights=entry.weights, offset=entry.offset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if entry.family == "gaussian":
            return model.fit(method=entry.method, **entry.options)
        return model.fit(method=entry.method, nagq=entry.nagq, **entry.options)


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


def compare(entry: CatalogueEntry, fit) -> pd.DataFrame:
    """compare(entry, fit) -> DataFrame

    One row per compared quantity: ours, reference, difference, tolerance, pass.
    """
    ref, tol = entry.reference, entry.tol
    rows = []
    obj_diff = fit.objective - ref["objective"]
    rows.append(("objective", fit.objective, ref["objective"], obj_diff, tol["objective_abs"],
                 bool(obj_diff <= tol["objective_abs"]),
                 "lower than reference (better optimum)" if obj_diff < -tol["objective_abs"] else ""))
    if "theta" in ref:
        th_ref = np.asarray(ref["theta"], dtype=float)
        d = np.abs(fit.theta - th_ref)
        i = int(np.argmax(d))
        if tol.get("theta_rel"):
            scale = np.maximum(np.abs(th_ref), 1e-2)
            i = int(np.argmax(d / scale))
            rows.append((f"theta (max rel, {i})", float(fit.theta[i]), float(th_ref[i]), float(d[i] / scale[i]),
                         tol["theta_rel"], bool(np.all(d <= tol["theta_rel"] * scale)), ""))
        else:
            rows.append((f"theta (max abs, {i})", float(fit.theta[i]), float(th_ref[i]), float(d[i]), tol["theta_abs"],
                         bool(np.all(d <= tol["theta_abs"])), ""))
    for key, label, tkey in (("fixef", "fixef", "fixef_rel"), ("se", "se", "se_rel")):
        if key in ref:
            names = list(ref[key])
            ours = getattr(fit, key).reindex(names).to_numpy(dtype=float)
            theirs = np.array([ref[key][n] for n in names], dtype=float)
            r = _rel(ours, theirs)
            absd = np.abs(ours - theirs)
            abs_tol = tol.get(f"{key}_abs") or 0.0
            ok = bool(np.all((r <= tol[tkey]) | (absd <= abs_tol)))
            i = int(np.nanargmax(r))
            rows.append((f"{label} (max rel, {names[i]})", float(ours[i]), float(theirs[i]), float(r[i]), tol[tkey], ok, ""))
    if "sigma" in ref and ref["sigma"] is not None and getattr(fit, "_dispersion", True):
        r = abs(fit.sigma - ref["sigma"]) / ref["sigma"]
        rows.append(("sigma (rel)", fit.sigma, ref["sigma"], r, tol["sigma_rel"], bool(r <= tol["sigma_rel"]), ""))
    return pd.DataFrame(rows, columns=["quantity", "ours", "reference", "difference", "tolerance", "pass", "note"])


def validate(directory: str | Path | None = None, ids: list[str] | None = None, verbose: bool = True) -> pd.DataFrame:
    """validate(directory=None, ids=None, verbose=True) -> DataFrame

    Fit every catalogue model (or those in ``ids``) and compare with its
    reference. Returns one row per model: id, source, objective difference,
    worst relative differences, time and pass/fail.
    """
    entries = load_catalogue(directory)
    if ids:
        entries = [e for e in entries if e.id in ids]
    rows = []
    for e in entries:
        t0 = time.perf_counter()
        try:
            fit = fit_entry(e)
        except Exception as exc:  # report, keep going
            rows.append({"id": e.id, "source": e.source, "pass": False, "error": f"{type(exc).__name__}: {exc}"})
            if verbose:
                print(f"{e.id:32s} ERROR {type(exc).__name__}: {exc}")
            continue
        el = time.perf_counter() - t0
        cmp = compare(e, fit)
        row = {"id": e.id, "method": e.method if e.family == "gaussian" else f"{e.method}({e.nagq})",
               "objective": fit.objective, "reference": e.reference["objective"],
               "obj_diff": fit.objective - e.reference["objective"]}
        for _, r in cmp.iloc[1:].iterrows():
            row[r["quantity"].split(" ")[0] + "_diff"] = r["difference"]
        row.update({"seconds": el, "pass": bool(cmp["pass"].all()), "source": e.source})
        rows.append(row)
        if verbose:
            flag = "ok  " if row["pass"] else "FAIL"
            print(f"{flag} {e.id:30s} objective {fit.objective:14.6f} ref {e.reference['objective']:14.6f} "
                  f"diff {row['obj_diff']:+.2e}  fixef {row.get('fixef_diff', np.nan):.1e}  "
                  f"theta {row.get('theta_diff', np.nan):.1e}  se {row.get('se_diff', np.nan):.1e}  {el:6.2f}s  [{e.source}]")
    return pd.DataFrame(rows)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return repr(float(v))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple | np.ndarray):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(entry: dict[str, Any]) -> str:
    """to_toml(entry) -> str: write a catalogue entry (top-level keys, then tables)."""
    lines, tables = [], []
    for k, v in entry.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")

    def emit(prefix: str, tab: dict[str, Any]) -> None:
        scalars = {k: v for k, v in tab.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in tab.items() if isinstance(v, dict)}
        lines.append("")
        lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            key = k if k.replace("_", "").isalnum() else _toml_value(k)
            lines.append(f"{key} = {_toml_value(v)}")
        for k, v in subs.items():
            emit(f"{prefix}.{k}", v)

    for k, v in tables:
        emit(k, v)
    return "\n".join(lines) + "\n"
