"""The benchmarks run the checkout they sit in, whether or not ddaug is installed (a lent GPU
machine has no ddaug): importing this module puts a folder that holds one link, ddaug -> this
checkout, first on sys.path, and on PYTHONPATH for the ddaug processes a benchmark starts."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK_DIR = os.path.join(tempfile.gettempdir(),
                        f"ddaug-checkout-{os.getuid()}-{hashlib.sha256(ROOT.encode()).hexdigest()[:12]}")


def _link() -> None:
    os.makedirs(LINK_DIR, exist_ok=True)
    link = os.path.join(LINK_DIR, "ddaug")
    if os.path.islink(link) and os.readlink(link) == ROOT:
        return
    tmp = f"{link}.{os.getpid()}"
    os.symlink(ROOT, tmp)
    os.replace(tmp, link)  # atomic: benchmarks started side by side never see a missing link


_link()
sys.path.insert(0, LINK_DIR)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (LINK_DIR, os.environ.get("PYTHONPATH")) if p)
