"""The README is where users look: its config reference and commands must match the code."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date():
    readme = (ROOT / "README.md").read_text()
    assert _load_script().embed(readme) == readme, "run: python scripts/config_reference.py --write README.md"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    quickstart = [line for line in blocks[0].splitlines() if not line.startswith("#")]
    tests = [line for line in blocks[1].splitlines() if not line.startswith("#")]
    assert quickstart == ["bash scripts/setup.sh && .venv/bin/rebelrl train configs/quickstart.yaml"]
    assert tests[0] in (ROOT / ".ci" / "run").read_text()
