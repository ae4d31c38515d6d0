"""Packaging: the wheel installs jason.py as the package `jason`, so that it can carry py.typed.

PEP 561 marks a library as typed with a py.typed file, which only a package
can hold. The repository and a vendored copy stay one file, jason.py; only
the wheel wraps it, in a package made here under build/: jason/__init__.py
(jason.py itself), jason/__main__.py (so `python -m jason` still runs the
command line) and jason/py.typed. Everything else is in pyproject.toml.
"""

import os
import shutil

from setuptools import setup

PACKAGE = os.path.join("build", "package", "jason")

os.makedirs(PACKAGE, exist_ok=True)
shutil.copyfile("jason.py", os.path.join(PACKAGE, "__init__.py"))
with open(os.path.join(PACKAGE, "__main__.py"), "w", encoding="utf-8") as main:
    main.write("import sys\n\nfrom jason import main\n\nsys.exit(main())\n")
with open(os.path.join(PACKAGE, "py.typed"), "w", encoding="utf-8"):
    pass  # empty: the package's own annotations are its types

setup(packages=["jason"], package_dir={"jason": PACKAGE}, package_data={"jason": ["py.typed"]})
