"""The README's set-up commands are the ones CI runs, and its examples name real commands."""

from __future__ import annotations

import re
import subprocess

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


def _docs() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_in_readme_and_docs_points_to_a_file():
    """[text](target) links that are not URLs or pure anchors name files that exist in the repository."""
    broken = []
    for page in _docs():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are examples
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_readme_is_a_front_door_linking_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert readme.index("## Layout") < readme.index("## The flow")
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme or page.name in (REPO / "docs" / "index.md").read_text(), page.name
    for line in ("**Security model**", "**Real model**", "**GPU**"):
        assert line in readme


def test_no_file_cites_a_document_the_repository_lacks():
    """The design notes this project started from live outside the repository: nothing may cite them."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    cited = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in {".py", ".md", ".toml", ".yml", ".yaml", ".txt", ".cfg"} or not path.is_file():
            continue
        for doc in (f"{stem}.md" for stem in ("DESIGN", "FIXTURES", "STYLE")):
            if doc in path.read_text(errors="replace") and not (REPO / doc).exists():
                cited.append(f"{name}: {doc}")
    assert not cited, cited
