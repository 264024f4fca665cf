"""The package's shape: one builder, then the paths; no import circle; a light ``import stochmm``.

Imports are read from the source (module-level and function-level alike), so a lazy import
inside a function counts as much as one at the top of a file.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "stochmm"
PATHS = ("stochmm.deterministic", "stochmm.stochastic", "stochmm.moments", "stochmm.inference")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> package modules it imports (parents of itself excluded)."""
    graph = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                cands = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            for c in cands:
                while c and c not in mods:
                    c = c.rsplit(".", 1)[0] if "." in c else ""
                if c and c != m and not m.startswith(c + "."):
                    out.add(c)
        graph[m] = out
    return graph


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_no_import_circle():
    graph = _imports(_modules())
    circles = sorted(m for m in graph if m in _reach(graph, m))
    assert circles == []


def test_builder_imports_no_estimation_path():
    graph = _imports(_modules())
    for m in graph:
        if m.startswith("stochmm.builder"):
            bad = {d for d in _reach(graph, m) if d.startswith(PATHS)}
            assert not bad, f"{m} reaches {sorted(bad)}"


@pytest.mark.parametrize("path", PATHS)
def test_paths_live_in_their_folders(path):
    assert (PKG / path.split(".")[1]).is_dir()


def test_import_is_light():
    code = ("import sys, stochmm; "
            "print(sorted(m for m in ('jax', 'numpyro', 'arviz', 'dask', 'xarray', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_public_names_still_work():
    import stochmm as sm

    for name in ("lmer", "glmer", "anova", "anova_components", "mom", "Model", "datasets", "moments"):
        assert getattr(sm, name) is not None
    assert callable(sm.moments.fit_parquet)
    fit = sm.Model("Yield ~ 1 + (1 | Batch)", sm.datasets.load("dyestuff")).fit(method="ML")
    assert fit.method == "ML"
