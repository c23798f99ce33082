"""The package version, in a module of its own so nothing imports the package root for it.

``pyproject.toml`` reads it from here (``[tool.setuptools.dynamic]``).
"""

__version__ = "0.1.0"
