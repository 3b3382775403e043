import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_ruff_is_clean():
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.unit
def test_only_config_reads_the_environment():
    """STYLE point 1: nothing but quarkflow_core/config.py calls os.getenv / os.environ."""
    offenders = []
    for path in [
        *ROOT.glob("quarkflow_core/**/*.py"),
        *ROOT.glob("app/**/*.py"),
        *ROOT.glob("flows/**/*.py"),
        *ROOT.glob("pages/**/*.py"),
    ]:
        if path.name == "config.py":
            continue
        text = path.read_text()
        if "os.getenv" in text or "os.environ" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.unit
def test_the_core_does_not_import_the_entry_points():
    """quarkflow_core is the library; app/ (the CLI, the API, the workbench) is built on it,
    never the other way round: no import of app, and no process started as `python -m app...`
    (starting the product's processes is the launcher's job, app/launcher.py)."""
    offenders = []
    for path in ROOT.glob("quarkflow_core/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value == "app" or node.value.startswith(("app.", "app/")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(name == "app" or name.startswith("app.") for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
