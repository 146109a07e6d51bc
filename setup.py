"""The one thing pyproject.toml cannot say: the repository's top-level ``configs/`` ships inside the package as
``charlm.configs`` (``charlm train --config smoke`` from any folder after ``pip install .``). Everything else
about the package is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["charlm", "charlm.*"]), "charlm.configs"],
      package_dir={"charlm.configs": "configs"})
