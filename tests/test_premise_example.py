"""examples/premise_photos.py, the first step of docs/gap.md's premise run: two crop folders
with disjoint photo content, business PNG and general JPEG, the same on every run."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "examples", "premise_photos.py"), str(out),
           "--per-set", "12", "--side", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _photo(name: str) -> str:
    return name.rsplit("-", 1)[0]


def test_premise_crops_disjoint_formats_and_reproducible(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "b")
    sets = {}
    for folder, fmt in (("business-photos", "PNG"), ("general", "JPEG")):
        names = sorted(os.listdir(tmp_path / "a" / folder))
        assert len(names) == 12
        for name in names:
            with Image.open(tmp_path / "a" / folder / name) as im:
                assert (im.format, im.size, im.mode) == (fmt, (64, 64), "RGB")
            # the same seed gives the same crops
            assert (tmp_path / "a" / folder / name).read_bytes() == (tmp_path / "b" / folder / name).read_bytes()
        sets[folder] = {_photo(n) for n in names}
    assert len(sets["business-photos"]) == 5 and len(sets["general"]) == 6
    assert not sets["business-photos"] & sets["general"]
