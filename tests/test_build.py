"""setup.py links the C++ runtime as a shared library, whatever the compiler would do by default.

On one GPU image the compiler was a wrapper (`g++ -B<private folder>`) whose private folder held
only `libstdc++.a`: the extensions linked the C++ runtime statically, carried a second copy of it
beside torch's, and every C++ exception thrown from them (each TORCH_CHECK on a bad input) crashed
the process. This test builds `unet._C` here with such a wrapper and checks the result.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and libstdc++ only")


def static_runtime_compiler(folder: Path) -> Path:
    """A g++ wrapper whose private library folder holds only the static C++ runtime."""
    gxx = shutil.which("g++")
    archive = gxx and subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True,
                                     text=True).stdout.strip()
    if not archive or not os.path.isabs(archive):
        pytest.skip("no g++ with a static libstdc++.a")
    private = folder / "private"
    private.mkdir()
    shutil.copy(archive, private / "libstdc++.a")
    wrapper = folder / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {gxx} -B{private}/ "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def needed_libraries(shared_object: Path) -> list[str]:
    dynamic = subprocess.run(["readelf", "-d", str(shared_object)], capture_output=True, text=True,
                             check=True).stdout
    return [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]


@pytest.mark.slow
def test_extension_links_the_shared_cxx_runtime_with_a_static_only_compiler(tmp_path):
    if shutil.which("readelf") is None:
        pytest.skip("readelf is not installed")
    compiler = static_runtime_compiler(tmp_path)
    environment = dict(os.environ, CXX=str(compiler), BUILD_EXTENSIONS="unet._C",
                       LOCALATTN_WITH_CUDA="0", MAX_JOBS="2")
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "temp")],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert str(compiler) in build.stdout  # the wrapper did the linking
    [extension] = (tmp_path / "lib" / "unet").glob("_C*.so")
    assert "libstdc++.so.6" in needed_libraries(extension)
