"""Packaging beyond pyproject.toml: the reference catalogue ships inside the package.

The top-level ``models/`` folder is the catalogue's one source (the R scripts that made
its numbers sit in ``models/reference/``); it is mapped to ``stochmm.models`` so a wheel
installs it next to the code and ``stochmm validate`` finds it from any folder.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["stochmm*"]), "stochmm.models"],
    package_dir={"stochmm.models": "models"},
)
