"""`--help` of every command writes click's value names (TEXT, INTEGER, PATH...) and nothing after a flag, not
typer's Python types (`<str>`, `<bool>` after every flag and after --help itself)."""
import re

import typer.main
from typer.testing import CliRunner

from patchcore.cli import app


def commands(group, path=()):
    yield path
    for name, command in getattr(group, "commands", {}).items():
        yield from commands(command, (*path, name))


def test_help_has_value_names_and_no_python_types():
    runner = CliRunner()
    paths = list(commands(typer.main.get_command(app)))
    assert ("up",) in paths and ("deadletter", "replay") in paths and len(paths) > 15
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert not re.search(r"<(bool|str|int|float|path|list\[)", result.output), (path, result.output)
        for line in result.output.splitlines():  # a flag takes no value: nothing between it and its help
            if re.search(r"--help\s|--progress\s|--force\s|--all\s", line):
                assert not re.search(r"\b(BOOL|BOOLEAN|TEXT|INTEGER)\b", line), (path, line)
    up = runner.invoke(app, ["up", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--source\s+TEXT", up) and re.search(r"--frames\s+INTEGER", up)
    assert re.search(r"--fps\s+FLOAT", up) and re.search(r"--bank\s+PATH", up)
    score = runner.invoke(app, ["score", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"bank\s+PATH", score) and re.search(r"images\.\.\.\s+PATH\.\.\.", score)
