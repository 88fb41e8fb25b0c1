"""The product never imports the lab.

The product is ``antenna_flows`` with ``flows/``, ``tasks/`` and ``deployments/``: what runs on
a GPU host. The lab (``lab/antenna_lab``: local Antenna, bench, baselines) is a distribution of
its own that may import the product, never the other way round; it plugs its commands into
``antenna-flows`` through entry points, so no product module is exempt. A product-only install
(``pip install .``) must not even find it: :func:`test_product_install_has_no_lab` checks the wheel.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [ROOT / "antenna_flows", ROOT / "flows", ROOT / "tasks", ROOT / "deployments"]
LAB = "antenna_lab"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def product_files() -> list[Path]:
    files = []
    for top in PRODUCT:
        for path in top.rglob("*.py"):
            files.append(path)
    return files


def test_product_never_imports_lab():
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in imported_modules(path) if n == LAB or n.startswith(LAB + "."))
        for path in product_files()
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"product modules import the lab: {offenders}"
    assert not (ROOT / "antenna_flows" / "lab").exists(), "the lab lives in lab/antenna_lab, not in the product"


def test_the_check_sees_lab_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from antenna_lab.antenna.demo_images import generate_frame\nimport antenna_lab\n")
    assert {LAB, "antenna_lab.antenna.demo_images"} <= imported_modules(probe)
    assert len(product_files()) > 20  # the walk found the product


def test_product_modules_stay_small():
    """One concept per module: none over ~400 lines unless its docstring says why (a 'long because' line)."""
    long = []
    for path in product_files():
        text = path.read_text()
        if text.count("\n") > 420 and "long because" not in text[:3000]:
            long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long, f"modules over ~400 lines without a reason: {long}"
