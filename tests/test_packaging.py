"""The top-level packages falcon-serve installs (engine, server, kernels): another distribution's `kernels` first
on the path (Hugging Face's, which transformers >= 5.25 installs) is refused at `import engine`, by name."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_engine(pythonpath: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, "-c", "import engine, kernels; print(kernels.__file__)"], cwd=cwd,
                          env=env, capture_output=True, text=True)


def test_engine_imports_beside_its_own_kernels(tmp_path):
    done = import_engine([REPO], tmp_path)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO / "kernels" / "__init__.py"


def test_a_shadowing_kernels_package_is_refused_by_name(tmp_path):
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    done = import_engine([tmp_path / "site", REPO], tmp_path)
    assert done.returncode != 0
    assert "ImportError: falcon-serve's `kernels` package" in done.stderr
    assert str(other / "__init__.py") in done.stderr and "pip uninstall kernels" in done.stderr
