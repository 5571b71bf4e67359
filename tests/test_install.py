"""The library installs (pyproject.toml) into a fresh venv and imports from another directory under its
own package name, without shadowing other distributions (no top-level sparsemax / layers / deq)."""
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "MANIFEST.in", "README.md", "sparse_structured_hopfield", "sparsemax.py",
           "sparsemax_kernels.py", "layers.py", "deq.py"]

# run in the fresh venv, from a directory without the repo's files; a stand-in for PyPI's unrelated
# ``sparsemax`` is installed beside ours and must stay what ``import sparsemax`` finds
CHECK = textwrap.dedent("""
    import importlib.util, sys, torch
    import sparsemax                                    # the other distribution
    import sparse_structured_hopfield as ssh
    from sparse_structured_hopfield import HopfieldPooling, causal_mask
    assert sparsemax.WHO == "another distribution", sparsemax.__file__
    assert ssh.__file__.startswith(sys.argv[1]), (ssh.__file__, sys.argv[1])
    for flat in ("layers", "deq", "sparsemax_kernels"):
        assert importlib.util.find_spec(flat) is None, flat
    assert ssh.sparsemax._K is ssh.sparsemax_kernels    # the numba kernels are ours, loaded
    assert "sparsemax_kernels" not in sys.modules
    assert ssh.layers.sparsemax is ssh.sparsemax
    pool = HopfieldPooling(8, 2, True, 1, 0.0, "sparsemax", 4.0, 3)
    mask = ~causal_mask(5)[:3]                          # query i may associate with patterns > i only
    out, w = pool(torch.randn(2, 5, 8), return_weights=True, association_mask=mask)
    assert out.shape == (2, 3, 8) and torch.all(w[..., mask] == 0)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 3))
    print("ok", ssh.__file__)
""")


def _venv(root: Path) -> tuple[Path, Path]:
    """A fresh venv (no pip, no packages) that sees this venv's site-packages (torch, numba, setuptools)
    through a .pth file, so that nothing needs downloading."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "_outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    other = purelib / "sparsemax"  # stand-in for PyPI's unrelated package of that name
    other.mkdir()
    (other / "__init__.py").write_text('WHO = "another distribution"\n')
    return python, purelib


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_pip_install_then_import_from_elsewhere(tmp_path, editable):
    src = tmp_path / "src"  # a copy: building in the repo would leave build/ and *.egg-info behind
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    python, purelib = _venv(tmp_path / "venv")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
           "--no-build-isolation", "--no-index"]
    subprocess.run(pip + (["-e", str(src)] if editable else [str(src)]), check=True, cwd=tmp_path)
    expected = src if editable else purelib
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([str(python), "-c", CHECK, str(expected)], cwd=elsewhere, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok")
