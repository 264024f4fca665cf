"""Every model of the models/ catalogue against its pinned reference."""

from pathlib import Path

import pytest

from stochmm.catalogue import compare, fit_entry, load_catalogue, to_toml

MODELS = Path(__file__).resolve().parent.parent / "models"
ENTRIES = load_catalogue(MODELS)


def test_catalogue_is_complete():
    ids = {e.id for e in ENTRIES}
    for required in ["sleepstudy_slopes_REML", "sleepstudy_slopes_ML", "sleepstudy_dblbar_ML", "dyestuff_ML",
                     "dyestuff_REML", "dyestuff2_ML", "insteval_ML", "insteval_REML", "pastes_nested_ML",
                     "penicillin_crossed_ML"]:
        assert required in ids
    for e in ENTRIES:
        assert e.source and "objective" in e.reference, e.id


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.id for e in ENTRIES])
def test_entry_matches_reference(entry):
    fit = fit_entry(entry)
    table = compare(entry, fit)
    assert table["pass"].all(), "\n" + table.to_string()


def test_toml_round_trip(tmp_path):
    import tomllib

    entry = {"id": "x", "source": "s", "reference": {"objective": 1.5, "fixef": {"(Intercept)": 2.0, "a:b": -1e-20}}}
    text = to_toml(entry)
    assert tomllib.loads(text) == entry


def test_wheel_ships_the_catalogue_and_validate_runs_from_another_folder(tmp_path):
    """A normal (non-editable) install: build a wheel from the sources, install it into a fresh venv
    (system site-packages for the dependencies, --no-deps: fast and offline) and run `stochmm validate`
    outside the checkout."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    root = MODELS.parent
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(root / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "reference")
    shutil.copytree(root / "stochmm", src / "stochmm", ignore=skip)
    shutil.copytree(root / "models", src / "models", ignore=skip)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = dict(capture_output=True, text=True, env=env, timeout=300)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                          str(src)], **run)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("stochmm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"stochmm/models/{p.name}" for p in MODELS.glob("*.toml")} <= set(names)
    packages = {str(p.parent.relative_to(root)) for p in (root / "stochmm").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= set(names)  # every subpackage ships
    venv = tmp_path / "venv"
    out = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], **run)
    assert out.returncode == 0, out.stderr
    py = venv / "bin" / "python"
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                          str(wheel)], **run)
    assert out.returncode == 0, out.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([str(venv / "bin" / "stochmm"), "validate", "dyestuff_ML"], cwd=elsewhere, **run)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 0 failed" in out.stdout
    where = subprocess.run([str(py), "-c", "import stochmm; print(stochmm.__file__)"], cwd=elsewhere, **run)
    assert str(venv) in where.stdout  # the installed wheel ran, not the checkout
