"""CLI options derived from settings dataclasses, so a setting's default and help are written once: in the
dataclass field, `field(default=8, metadata={"help": "..."})`.

`settings_options(WorkerSettings, "max_batch", "max_wait_ms", into="worker")` turns those fields into the
command's `--max-batch` and `--max-wait-ms` options (type from the field's annotation, default from the
dataclass, help from the field's metadata) and hands the parsed values to the command as one dict, its parameter
`worker` ({"max_batch": 8, "max_wait_ms": 50}), from which the command builds the settings object
(`WorkerSettings(**worker, ...)`). Typer reads the options from the function's signature, so the decorator
rewrites `__signature__`: the parameter `into` is replaced, where it stands, by one keyword parameter per field,
annotated `Annotated[type, typer.Option(...)]`.

Adding an option later is one line: give the field its help (`metadata={"help": ...}`) and add its name to the
`settings_options(...)` call of the command. Anything else a field's option needs goes in its metadata as the
keywords of `typer.Option` (`envvar`, `min`, `max`, `param_decls` for another spelling), or, where one command
needs it differently, in `options={"field": {...}}` of the call.

`defaults` may be the class (its fields' defaults; a field without one is a required option) or an instance
(its values are the defaults: `UpSettings().build.view` gives `up` the view of the bank it builds).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Any, Callable, Mapping, Optional

import typer

OPTION_KEYS = ("help", "envvar", "min", "max", "param_decls")  # field metadata passed on to typer.Option


class SettingsOptionError(TypeError):
    """A settings_options call names something that is not a field, or a parameter that is not there."""


def field_default(defaults: Any, name: str) -> Any:
    """The default of field `name`: the instance's value, or the class field's default (`...`: required)."""
    if not isinstance(defaults, type):
        return getattr(defaults, name)
    field = _fields(defaults)[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return ...


def settings_options(defaults: Any, *names: str, into: str, rename: Mapping[str, str] | None = None,
                     options: Mapping[str, Mapping[str, Any]] | None = None,
                     make: Callable[..., Any] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: fields `names` of the dataclass `defaults` become options of the command, in place of its
    parameter `into`, which receives {field name: parsed value}, or `make(**those)` when `make` is given.

    rename: field -> the command's parameter (and so option) name where they differ, e.g. {"max_frames":
    "frames"} for `--frames`. options: field -> more `typer.Option` keywords for this command (they win over the
    field's metadata), e.g. {"reorder": {"min": 1}}."""
    cls = defaults if isinstance(defaults, type) else type(defaults)
    known = _fields(cls)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SettingsOptionError(f"{cls.__name__} has no fields {unknown}")
    rename, options = dict(rename or {}), dict(options or {})

    def parameter(name: str) -> inspect.Parameter:
        return inspect.Parameter(rename.get(name, name), inspect.Parameter.KEYWORD_ONLY,
                                 default=field_default(defaults, name),
                                 annotation=field_option(cls, name, **options.get(name, {})))

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        if into not in signature.parameters:
            raise SettingsOptionError(f"{command.__name__} has no parameter {into!r} to put {cls.__name__}'s options")
        params = []
        for param in signature.parameters.values():
            if param.name == into:
                params += [parameter(name) for name in names]
            else:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def with_settings(**kwargs):
            values = {name: kwargs.pop(rename.get(name, name)) for name in names}
            kwargs[into] = values if make is None else make(**values)
            return command(**kwargs)

        with_settings.__signature__ = signature.replace(parameters=params)
        return with_settings

    return decorate


def field_option(cls: type, name: str, **keywords: Any) -> Any:
    """`Annotated[type, typer.Option(...)]` of one field: for a command that takes one setting as a plain
    parameter, `device: field_option(WorkerSettings, "device") = WorkerSettings.device` (default from the class)."""
    field = _fields(cls).get(name)
    if field is None:
        raise SettingsOptionError(f"{cls.__name__} has no field {name!r}")
    keywords = {**{k: v for k, v in field.metadata.items() if k in OPTION_KEYS}, **keywords}
    decls = keywords.pop("param_decls", ())
    decls = (decls,) if isinstance(decls, str) else tuple(decls)
    return typing.Annotated[_cli_type(typing.get_type_hints(cls)[name]), typer.Option(*decls, **keywords)]


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    if not dataclasses.is_dataclass(cls):
        raise SettingsOptionError(f"{cls!r} is not a dataclass")
    return {f.name: f for f in dataclasses.fields(cls)}


def _cli_type(hint: Any) -> Any:
    """`X | None` as Optional[X] (what typer reads); other types as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return Optional[args[0]]
    return hint
