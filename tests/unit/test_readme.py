"""The README's two commands are the contract with a new user; CI must run the test one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```sh\n")[1:]
    return [block.split("```")[0].strip() for block in blocks]


def test_readme_has_a_run_command_and_a_test_command_that_ci_runs():
    run, test = _readme_commands()[:2]
    assert run.endswith("flywheel up")
    assert "pytest" in test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
