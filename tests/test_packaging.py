"""What `pip install` puts on a user's machine: one import package, `ddaug`, that works from a
folder holding a trainer's own `pipeline.py` and `shards/` (common names in training repos),
both as a regular wheel and as the editable install the test suite itself runs on."""

from __future__ import annotations

import glob
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Decoys fail loudly if anything imports them instead of ddaug's own modules.
DECOY = "raise ImportError('the decoy {name} was imported instead of ddaug.{name}')\n"
CHECK = ("import sys, ddaug; from ddaug import MixedShardDataset, CheckpointableLoader, ChatCollator; "
         "from ddaug.shards import ShardWriter; import ddaug.cli; "
         "assert MixedShardDataset.__module__ == 'ddaug.shards.loader'; "
         "assert all(n not in sys.modules for n in ('pipeline', 'shards', 'cli', 'augment')); "
         "print(ddaug.__file__)")


def _decoy_folder(path) -> str:
    path.mkdir()
    (path / "pipeline.py").write_text(DECOY.format(name="pipeline"))
    (path / "shards").mkdir()
    (path / "shards" / "__init__.py").write_text(DECOY.format(name="shards"))
    (path / "cli.py").write_text(DECOY.format(name="cli"))
    return str(path)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources, so the build's own folders (build/, *.egg-info) stay out of the checkout.
    src = str(tmp_path_factory.mktemp("src") / "ddaug")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", ".git", "*.egg-info", "__pycache__",
                                                             ".whl", ".gl", "out", "demo-out"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), src],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = glob.glob(str(out / "ddaug-*.whl"))
    return path


def test_the_wheel_installs_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = [t for t in tops if t.endswith(".dist-info")]
    assert len(dist_info) == 1 and tops - set(dist_info) == {"ddaug"}, sorted(tops)
    assert "ddaug/__init__.py" in names and "ddaug/__main__.py" in names and "ddaug/cli.py" in names
    assert "ddaug/shards/loader.py" in names
    assert any(n.startswith("ddaug/augment/tiny/weights/") and n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.startswith(("ddaug/tests/", "ddaug/bench/", "ddaug/examples/"))]
    entry = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/entry_points.txt").decode()
    assert "ddaug = ddaug.cli:main" in entry


def test_a_wheel_install_runs_the_demo_next_to_decoys(wheel, tmp_path):
    """A fresh venv with the wheel; its dependencies come from this interpreter's site-packages
    (a .pth file), so no second torch is installed. `ddaug demo` runs on the trained tiny model
    from a folder whose decoys would break a package that installed generic top-level names."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = str(venv / "bin" / "python")
    purelib = subprocess.check_output([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      text=True).strip()
    deps = [p for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
            if os.path.isdir(p)]
    with open(os.path.join(purelib, "deps.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")  # plain paths: the editable install's own .pth is not run
    r = subprocess.run([sys.executable, "-m", "pip", "--python", vpy, "install", "--no-deps", "-q", wheel],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    work = _decoy_folder(tmp_path / "trainer")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([vpy, "-c", CHECK], cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith(purelib), r.stdout  # the wheel's copy, not the checkout
    r = subprocess.run([str(venv / "bin" / "ddaug"), "demo", "-o", "demo"], cwd=work, capture_output=True,
                       text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert os.path.isfile(os.path.join(work, "demo", "preview.png")), r.stdout
    r = subprocess.run([vpy, "-m", "ddaug", "inspect", "demo/augmented", "--verify", "--json"], cwd=work,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["samples"] == 4 and report["problems"] == [], report


def test_the_editable_install_imports_past_decoys(tmp_path):
    work = _decoy_folder(tmp_path / "trainer")
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "ddaug", "--help"], cwd=work, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "augment" in r.stdout, r.stderr[-2000:]


def test_the_public_face_names_documented_objects():
    """Every name in ddaug.__all__ loads and says what it is (a dataclass's generated signature
    is not a docstring)."""
    import ddaug

    for name in ddaug.__all__:
        if name == "__version__":
            continue
        obj = getattr(ddaug, name)
        doc = (obj.__doc__ or "").strip()
        assert doc and not doc.startswith(f"{name}("), f"ddaug.{name} has no docstring"
