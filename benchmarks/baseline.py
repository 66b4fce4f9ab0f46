"""An earlier revision of gradwatch, importable beside the current one as ``gradwatch_base``.

Used by ``step_ab.py --baseline REV`` to time a change before against after in one
process, step by step (the machine's drift then hits both alike).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from types import ModuleType

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(revision: str, name: str = "gradwatch_base") -> ModuleType:
    """Returns the package ``gradwatch`` of git ``revision``, imported as ``name``.

    Args:
        revision: a git revision of this repository (a commit, ``HEAD~3``, a tag).
        name: the package name of this copy (several copies may live in one process).

    Returns:
        The imported package (its own TensorFlow variables and files).
    """
    target = tempfile.mkdtemp(prefix="gradwatch-baseline-")
    archive = subprocess.run(["git", "-C", _ROOT, "archive", "--format=tar", revision, "gradwatch"],
                             check=True, capture_output=True).stdout
    archive_path = os.path.join(target, "src.tar")
    with open(archive_path, "wb") as f:
        f.write(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(target, filter="data")
    package = os.path.join(target, name)
    os.rename(os.path.join(target, "gradwatch"), package)
    for folder, _, files in os.walk(package):
        for file_name in files:
            if file_name.endswith(".py"):
                path = os.path.join(folder, file_name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                text = re.sub(r"\bgradwatch(\.|\s+import\b)", name + r"\1", text)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    sys.path.insert(0, target)
    return importlib.import_module(name)
