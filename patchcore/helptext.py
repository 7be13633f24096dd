"""Help text with click's value names: typer (0.29) writes Python types after every option instead."""
from __future__ import annotations

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption


class _ValueNames:
    """Help with click's value names: nothing after a flag, TEXT / INTEGER / FLOAT / PATH after an option or
    argument that takes a value. Typer's rich help prints Python types instead (`<str>`, `<list[Path]>`, and
    `<bool>` after every flag, --help included). Options get it as their metavar (one they set still wins);
    arguments, whose type column typer draws from the type alone, get it as that column."""

    NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "int range": "INTEGER", "float range": "FLOAT"}

    def format_help(self, ctx, formatter) -> None:
        for param in self.get_params(ctx):
            label = param.display_type(ctx).strip("<>")
            many = label.startswith("list[")
            label = label.removeprefix("list[").removesuffix("]").lower()
            name = self.NAMES.get(label, label.upper())
            if isinstance(param, TyperOption) and param.metavar is None:
                param.metavar = "" if param.is_flag or param.count else name
            elif isinstance(param, TyperArgument):
                param.display_type_rich = lambda ctx, name=name + ("..." if many else ""): name
        super().format_help(ctx, formatter)


class _Command(_ValueNames, TyperCommand):
    pass


class Group(_ValueNames, TyperGroup):
    pass


class Typer(typer.Typer):
    """typer.Typer whose commands and groups write their help with _ValueNames (a group class given as `cls`
    should derive from Group)."""

    def __init__(self, **kwargs):
        super().__init__(**{"cls": Group, **kwargs})

    def command(self, *args, **kwargs):
        return super().command(*args, **{"cls": _Command, **kwargs})
