"""Packaging: the wheel installs everything under `joulecap.` and nothing generic at top level."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from _factories import REPO

PACKAGE_ROOTS = {
    "runtime": "joulecap.runtime",
    "policies": "joulecap.policies",
    "kernels": "joulecap.kernels",
}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for folder, dotted in PACKAGE_ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([dotted, *rel.parts]) if rel.parts else dotted)
    assert found == listed


def test_one_console_script() -> None:
    assert _pyproject()["project"]["scripts"] == {"joulecap": "joulecap.runtime.cli:main"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("joulecap-*.whl")
    return whl


def test_wheel_has_no_generic_top_level_modules(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"joulecap"}
    assert not {"runtime", "policies", "kernels"} & top
    assert "joulecap/runtime/cli.py" in names
    assert "joulecap/kernels/__init__.py" in names
    assert "joulecap/runtime/data/default_profile.json" in names
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["joulecap"]


def test_installed_package_imports_under_namespace() -> None:
    code = (
        "import joulecap.runtime, joulecap.policies, joulecap.kernels, importlib.util as u; "
        "print(u.find_spec('runtime'), u.find_spec('policies'))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "None None"


def test_the_root_kernels_folder_hands_over_to_an_installed_kernels(tmp_path: Path) -> None:
    # `python -c`/`-m` run from the repository root put the root first on sys.path, where this
    # repository's kernels/ answers `import kernels`: Hugging Face's package of that name (which
    # transformers imports) must still be the one imported, submodules included.
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    (site / "kernels" / "layer.py").write_text("WHO = 'installed layer'\n")
    code = "import kernels, kernels.layer; print(kernels.WHO, '|', kernels.layer.WHO)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "installed | installed layer"
    # This environment as it is: its installed `kernels` (transformers >= 5.25 brings one) or,
    # with none installed, this folder as before (nothing is hidden).
    import importlib.machinery

    others = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    installed = importlib.machinery.PathFinder.find_spec("kernels", others)
    expected = Path(installed.origin) if installed and installed.origin else REPO / "kernels" / "__init__.py"
    alone = subprocess.run(
        [sys.executable, "-c", "import kernels; print(kernels.__file__)"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert alone.returncode == 0, alone.stderr
    assert Path(alone.stdout.strip()) == expected
