"""`patchcore`: the operator CLI (Typer), assembled from patchcore/commands/.

A command's module is imported when the command runs (or help lists it), so a command loads only what its own
module needs: `patchcore status` never imports torch, `patchcore worker` does. COMMANDS (and BANK_COMMANDS for
the `bank` group) say which module's Typer `app` holds each command, in the order help lists them."""
from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import MutableMapping
from typing import Annotated

import typer
import typer.main

from .helptext import Group, Typer
from .logs import DEFAULT_LEVEL, setup_logging

COMMANDS = {
    "eval": "evaluate", "score": "evaluate", "export": "evaluate", "ingest": "stream", "worker": "scoring",
    "store": "stream", "rule": "ops", "alarms": "ops", "status": "ops", "up": "scoring",
    "bank": None,  # defined below: its commands come from two modules
    "alarm": "ops", "deadletter": "ops", "camera": "control", "audit": "control", "console": "console",
    "weights": "weights", "sink": "sink", "drift": "drift", "redis": "redisadmin",
}
BANK_COMMANDS = {"build": "bank", "combine": "bank", "info": "bank", "calibrate": "bank", "threshold": "bank",
                 "publish": "registry", "list": "registry",
                 "activate": "registry", "rollback": "registry", "update": "bank"}


@functools.lru_cache(maxsize=None)
def _module_group(module: str):
    """The click group of patchcore.commands.<module>'s Typer `app` (its commands by name)."""
    return typer.main.get_group(importlib.import_module(f"patchcore.commands.{module}").app)


class LazyCommands(MutableMapping):
    """A group's commands by name: those of `lazy` are built from their module on first lookup."""

    def __init__(self, lazy: dict, loaded: dict):
        self.lazy = {name: module for name, module in lazy.items() if module is not None}
        self.order = [*lazy, *(name for name in loaded if name not in lazy)]
        self.loaded = dict(loaded)

    def __getitem__(self, name: str):
        if name not in self.loaded:
            self.loaded[name] = _module_group(self.lazy[name]).commands[name]  # KeyError: no such command
        return self.loaded[name]

    def __setitem__(self, name: str, command) -> None:
        self.loaded[name] = command
        if name not in self.order:
            self.order.append(name)

    def __delitem__(self, name: str) -> None:
        self.loaded.pop(name, None)
        self.lazy.pop(name, None)
        self.order.remove(name)

    def __iter__(self):
        return iter(list(self.order))

    def __len__(self) -> int:
        return len(self.order)


def lazy_group(commands: dict) -> type:
    """A Group class whose commands `commands` (name -> module of patchcore.commands) load when looked up."""

    class LazyGroup(Group):
        def __init__(self, *args, commands_: dict = commands, **kwargs):
            kwargs["commands"] = LazyCommands(commands_, dict(kwargs.get("commands") or {}))
            super().__init__(*args, **kwargs)

    return LazyGroup


app = Typer(cls=lazy_group(COMMANDS), help="PatchCore visual inspection: banks, evaluation, and the streaming service.",
            no_args_is_help=True, pretty_exceptions_enable=False)
bank_app = Typer(cls=lazy_group(BANK_COMMANDS), help="Build, inspect, publish, activate and roll back memory banks.",
                 no_args_is_help=True)
app.add_typer(bank_app, name="bank")


@app.callback()
def main(log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = DEFAULT_LEVEL) -> None:
    setup_logging(log_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
