"""The README's set-up commands are the ones CI runs, and its examples name real commands."""

from __future__ import annotations

import re

from tests.builders import REPO


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = _bash_blocks(readme)
    test_cmd = blocks[1].strip()
    assert "pytest" in test_cmd and '".[test]"' in test_cmd
    assert test_cmd in ci, "the README's second set-up command must be what .ci/run runs"


def test_readme_first_command_runs_the_demo():
    first = _bash_blocks((REPO / "README.md").read_text())[0].strip()
    assert first.endswith("guard scan --demo")
    assert "torch==2.13.0" in first
