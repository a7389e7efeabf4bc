"""The package's version, in one place: ``dynamask.__version__``, ``dynamask --version`` and the package
metadata (pyproject.toml reads it: ``[tool.setuptools.dynamic] version``, without importing the package)."""

__version__ = "0.1.0"
