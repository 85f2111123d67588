"""Which packages the wheel holds; everything else is in pyproject.toml.

Every folder under attnlog/ is found, so a new subpackage (or a data folder such as
attnlog/render/static) needs no edit here; the top-level callbacks/ folder is added as
`attnlog.callbacks` (pyproject.toml maps it with `package-dir`).
"""

from setuptools import find_namespace_packages, setup

found = find_namespace_packages(include=["attnlog", "attnlog.*"], exclude=["*.__pycache__"])
setup(packages=[*found, "attnlog.callbacks"])
