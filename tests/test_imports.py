"""Import rules: the data side never imports torch or deepspeed; the library never imports the entry points."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["itune.data.prepare", "itune.data.synthetic", "itune.config", "data_tools.cli",
                                    "itune.eval.metrics", "itune.eval.report", "itune.dist"])
def test_no_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]; " \
           "print(bad); sys.exit(1 if bad else 0)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_library_does_not_import_entry_points():
    for f in (ROOT / "itune").rglob("*.py"):
        text = f.read_text()
        assert "import launcher" not in text and "from launcher" not in text, f
        assert "import data_tools" not in text and "from data_tools" not in text, f
