"""Docs that must stay in step with the code: the README's settings table and commands."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_lists_exactly_the_settings() -> None:
    documented = set(re.findall(r"^\| `INFERLANE_([A-Z0-9_]+)` \|", README.read_text(), re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert documented == fields, {"undocumented": fields - documented,
                                  "not a setting": documented - fields}


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    first_block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert re.search(r"^make demo\b", first_block, re.M)
    assert re.search(r"^make test\b", first_block, re.M)


def test_every_documented_command_has_help() -> None:
    runner = CliRunner()
    for args in (["--help"], ["demo", "--help"], ["stack", "up", "--help"],
                 ["topics", "create", "--help"], ["acls", "--help"],
                 ["models", "build", "--help"], ["schemas", "export", "--help"],
                 ["settings", "--help"],
                 ["serve", "recommendations", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage" in result.output


def test_test_file_names_are_unique_across_folders() -> None:
    # The test folders are not packages: two files with one name cannot be collected together.
    names = [p.name for p in (README.parent / "tests").rglob("test_*.py")]
    assert sorted(names) == sorted(set(names)), [n for n in set(names) if names.count(n) > 1]


def test_security_docs_acl_commands_are_what_inferlane_acls_prints() -> None:
    """docs/security.md's ACL sets are the output of the command they name (for the default
    settings), so they are the sets the tests apply (tests/integration/test_acls.py)."""
    text = (README.parent / "docs" / "security.md").read_text()
    blocks = re.findall(r"<!-- ((?:INFERLANE_\w+=\S+ )*)inferlane acls (.+?) -->\n```sh\n(.*?)```",
                        text, re.S)
    assert len(blocks) == 6
    runner = CliRunner()
    for env_text, args, documented in blocks:
        env = dict(pair.split("=", 1) for pair in env_text.split())
        result = runner.invoke(app, ["acls", *args.split()], env=env)
        assert result.exit_code == 0, result.output
        assert documented == result.output, args
