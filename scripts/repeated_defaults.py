"""Count settings whose default is written more than once: the same literal value under the same name (a
dataclass field, a function parameter, a module constant; CLI renames and `DEFAULT_` prefixes folded) in more
than one place of the code. A "setting" has a dataclass field or a module constant among its places (the
default's home); the second count adds names that are only ever function parameters. A field whose default refers to another (`= WorkerSettings.max_batch`,
`= DEFAULT_MAX_FRAME_BYTES`) is not a literal and so not counted; 0, 1, True, False, None and "" are too
common to mean anything and are left out.

    python scripts/repeated_defaults.py [ROOT]      # ROOT: a checkout (default: this one); -v lists each place
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("contracts", "runtime", "scorer", "ingest", "store", "workers", "console", "patchcore")
# CLI option name -> the settings field it sets, where they differ
ALIASES = {"coreset": "fraction", "view": "kind", "neighbours": "reweight_neighbours", "frames": "max_frames",
           "keep": "keep_versions", "after_s": "prune_after_s", "level": "log_level"}
TRIVIAL = (0, 1, True, False, None, "")


def literal(node: ast.AST):
    """The value of a constant expression (numbers, strings, `16 << 20`, `7 * 86_400`), else raise ValueError."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -literal(node.operand)
    if isinstance(node, ast.BinOp):
        left, right = literal(node.left), literal(node.right)
        ops = {ast.LShift: lambda a, b: a << b, ast.Mult: lambda a, b: a * b, ast.Add: lambda a, b: a + b,
               ast.Sub: lambda a, b: a - b, ast.Pow: lambda a, b: a ** b}
        if type(node.op) in ops:
            return ops[type(node.op)](left, right)
    raise ValueError


def name_key(name: str) -> str:
    key = name.lower().lstrip("_")
    key = key.removeprefix("default_")
    return ALIASES.get(key, key)


def defaults_in(path: Path):
    """(name, value, where) of every literal default in a file: dataclass fields (plain or field(default=...)),
    function parameters, module constants."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    value = item.value
                    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
                        value = next((k.value for k in value.keywords if k.arg == "default"), None)
                    if value is not None:
                        yield item.target.id, value, f"{path}:{item.lineno} {node.name}.{item.target.id}"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            for arg, value in zip(positional[len(positional) - len(args.defaults):], args.defaults):
                yield arg.arg, value, f"{path}:{node.lineno} {node.name}({arg.arg})"
            for arg, value in zip(args.kwonlyargs, args.kw_defaults):
                if value is not None:
                    yield arg.arg, value, f"{path}:{node.lineno} {node.name}({arg.arg})"
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            yield node.targets[0].id, node.value, f"{path}:{node.lineno} {node.targets[0].id}"


def is_setting(place: str) -> bool:
    """A settings dataclass field (`Class.field`) or a module constant (`NAME`), not a function's parameter."""
    return "(" not in place


def repeated(root: Path) -> dict[tuple[str, object], list[str]]:
    """(name, value) -> the places it is written, for those written more than once."""
    places = defaultdict(list)
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for name, node, where in defaults_in(path):
                try:
                    value = literal(node)
                except ValueError:
                    continue
                if any(value is t or (type(value) is type(t) and value == t) for t in TRIVIAL):
                    continue
                places[(name_key(name), value)].append(where.replace(str(root) + "/", ""))
    return {key: where for key, where in places.items() if len(where) > 1}


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    args = [a for a in argv if a != "-v"]
    root = Path(args[0] if args else Path(__file__).resolve().parents[1]).resolve()
    found = repeated(root)
    settings = {key: where for key, where in found.items() if any(is_setting(place) for place in where)}
    if verbose:
        for (name, value), where in sorted(found.items(), key=lambda kv: kv[0][0]):
            kind = "setting" if (name, value) in settings else "parameter"
            print(f"{name} = {value!r}: {len(where)} places ({kind})")
            for place in where:
                print(f"    {place}")
    print(f"settings written more than once (a dataclass field or module constant, and elsewhere): {len(settings)}")
    print(f"named literal defaults written more than once (function parameters included): {len(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
