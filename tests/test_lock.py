"""The environment is the committed lock and nothing else, and its native libraries load.

On 2026-12-02 a new torchaudio release (2.11.1, "torch>=2.11") made a range pin resolve to a wheel whose native
library does not load against torch 2.11.0, and every fresh install broke with an ``undefined symbol`` in the first
job. These tests turn each part of that into a clear, early failure:
- pyproject.toml and uv.lock agree (``uv lock --check``), and the check does fail on a bumped pin;
- every package in the venv is at the lock's version, and the venv holds nothing the lock does not;
- torch and torchaudio are exactly 2.11.0 (what the GPU machines have), and torchaudio's native libraries load.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.fixtures.lock import LOCK, ROOT, locked_versions

UV = Path(sys.executable).with_name("uv")


def uv_lock_check(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(UV), "lock", "--check", "--project", str(project)], capture_output=True, text=True,
                          timeout=180)


def test_lock_agrees_with_pyproject():
    result = uv_lock_check(ROOT)
    assert result.returncode == 0, f"uv.lock is out of date with pyproject.toml: run `make lock`\n{result.stderr}"


def test_lock_check_fails_on_a_pin_bumped_without_relocking(tmp_path):
    shutil.copy(LOCK, tmp_path / "uv.lock")
    (tmp_path / "README.md").write_text("copy\n")
    pyproject = (ROOT / "pyproject.toml").read_text()
    bumped = pyproject.replace('"pyyaml>=6"', '"pyyaml>=6.0.3"')
    assert bumped != pyproject, "the pin this test bumps is gone from pyproject.toml: pick another"
    (tmp_path / "pyproject.toml").write_text(pyproject)
    assert uv_lock_check(tmp_path).returncode == 0, uv_lock_check(tmp_path).stderr  # the copy alone is in sync
    (tmp_path / "pyproject.toml").write_text(bumped)
    result = uv_lock_check(tmp_path)
    assert result.returncode != 0
    assert "needs to be updated" in result.stderr, result.stderr


def test_installed_packages_are_exactly_the_lock():
    locked = {canonicalize_name(name): version for name, version in locked_versions().items()}
    # The venv's own site-packages only: `import ray` puts ray/thirdparty_files (a vendored colorama) on sys.path.
    site_packages = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in metadata.distributions(path=sorted(site_packages))}
    # pip is what `python -m venv` seeds and the set-up bootstraps uv with; uv sync leaves it.
    extra = sorted(set(installed) - set(locked) - {"pip"})
    wrong = {name: (installed[name], locked[name]) for name in set(installed) & set(locked)
             if installed[name] != locked[name]}
    assert not wrong, f"installed != locked (installed, locked): {wrong}; run `make setup`"
    assert not extra, f"installed but not in uv.lock: {extra}; run `make setup` (it installs exactly the lock)"


def test_torch_and_torchaudio_are_pinned_exactly_and_agree():
    import torch
    import torchaudio

    locked = locked_versions()
    assert locked["torch"] == "2.11.0" and locked["torchaudio"] == "2.11.0", "the GPU machines have exactly 2.11.0"
    release = re.compile(r"^[0-9.]+")
    assert release.match(torch.__version__).group(0) == locked["torch"], torch.__version__
    assert release.match(torchaudio.__version__).group(0) == locked["torchaudio"], torchaudio.__version__


def test_torchaudio_native_libraries_load_against_this_torch():
    """What broke: libtorchaudio built for a newer torch fails here with ``undefined symbol``, not in a job."""
    import torch
    import torchaudio

    libs = sorted((Path(torchaudio.__file__).parent / "lib").glob("*.so"))
    assert libs, "torchaudio ships no native library: not the registry's build"
    for lib in libs:
        try:
            torch.ops.load_library(str(lib))
        except OSError as e:
            pytest.fail(f"{lib.name} does not load against torch {torch.__version__}: {e}")
    from torchaudio import _extension

    assert _extension._IS_TORCHAUDIO_EXT_AVAILABLE
    assert torch.ops._torchaudio.is_align_available() in (True, False)  # a call into the loaded native op
