"""Import direction: flows -> pipeline -> odise_model; leaf model components never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAVES = {"feature_extractor", "implicit_captioner", "pixel_decoder", "transformer_decoder", "classifier", "postprocess", "clip"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the same package
                pkg = path.parent.name
                out.add(f"{pkg}.{node.module}" if node.module else pkg)
            elif node.module:
                out.add(node.module)
    return out


def test_import_direction():
    for package, forbidden in (("odise_model", ("pipeline", "flows")), ("pipeline", ("flows",))):
        for path in (ROOT / package).glob("*.py"):
            bad = [m for m in _imports(path) if m.split(".")[0] in forbidden]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_leaf_components_do_not_import_each_other():
    for leaf in LEAVES:
        imported = {m.split(".", 1)[1] for m in _imports(ROOT / "odise_model" / f"{leaf}.py") if m.startswith("odise_model.")}
        assert not (imported & (LEAVES - {leaf})), f"{leaf} imports {imported & LEAVES}"


def test_configs_hold_no_code():
    assert not list((ROOT / "configs").rglob("*.py"))


def test_import_odise_model_is_light():
    import subprocess
    import sys

    code = "import sys, odise_model; odise_model.load_vocabulary('coco_panoptic'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
