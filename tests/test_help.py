"""`--help` of every command writes click's value names (TEXT, INTEGER, PATH...) and nothing after a flag, not
typer's Python types (`<str>`, `<bool>` after every flag and after --help itself). Options derived from the
settings dataclasses carry their defaults and help, and no default is written again in patchcore/."""
import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

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


# ---- options derived from the settings dataclasses -------------------------------------------------------------
# command -> (settings object whose values are the defaults, {option: field}); written here from the dataclasses,
# independently of how patchcore/commands/ derives them
def _same(*names):
    return {"--" + name.replace("_", "-"): name for name in names}


def derived_options():
    from console.app import ConsoleSettings
    from contracts.keys import Keys
    from ingest.camera import IngestSettings
    from patchcore.up import UpSettings
    from scorer import BuildConfig, CalibrationConfig, CoresetConfig, FeatureConfig, ViewConfig
    from store.service import StoreSettings
    from workers.settings import WorkerSettings

    worker, up, store = WorkerSettings(), UpSettings(), StoreSettings()
    build = [(FeatureConfig(), _same("backbone")), (CoresetConfig(), {"--coreset": "fraction", "--seed": "seed"}),
             (ViewConfig(), {"--view": "kind", **_same("resize", "crop", "size", "scale", "tile", "overlap")}),
             (CalibrationConfig(), _same("folds", "contiguous", "false_alarm_rate", "confidence")),
             (BuildConfig(), {"--neighbours": "reweight_neighbours", "--batch-size": "batch_size"}),
             (worker, _same("device", "weights"))]
    connection = [(Keys(), {"--prefix": "prefix"})]
    return {
        ("worker",): [(worker, _same("max_batch", "max_wait_ms", "claim_idle_ms", "max_frame_bytes", "result_maps",
                                     "max_pixels", "max_deliveries", "device", "index", "weights", "precision",
                                     "channels_last", "prefetch", "wait_replicas", "wait_ms")), *connection],
        ("ingest",): [(IngestSettings(camera="c"), {**_same("line", "bank", "fps", "max_side", "encoding", "jpeg_quality",
                                                            "maxlen", "wait_replicas", "wait_ms"),
                                                    "--frames": "max_frames"}), *connection],
        ("store",): [(store, _same("name", "reorder")), (store.default_rule, _same("k", "n", "cooldown_s", "threshold")),
                     (store.drift, {f"--drift-{name.replace('_', '-')}": name for name in (
                         "window", "quantile", "level", "raise_share", "clear_share", "policy")}),
                     *connection],
        ("rule",): [(StoreSettings().default_rule, _same("k", "n", "cooldown_s", "threshold")), *connection],
        ("console",): [(ConsoleSettings(), _same("host", "port")), *connection],
        ("up",): [(up, _same("source", "seconds", "bank", "train", "warmup_frames", "fps", "max_batch", "max_wait_ms",
                             "prefetch", "device", "precision", "channels_last", "engine", "redis_url", "bank_name",
                             "force", "metrics_port", "console_port")),
                  (up.rule, _same("k", "n", "cooldown_s", "threshold")), (up.build.features, _same("backbone")),
                  (up.build.coreset, {"--coreset": "fraction"}),
                  (up.build.view, {"--view": "kind", **_same("size", "scale", "tile", "overlap")})],
        ("bank", "build"): [*build, (UpSettings(), _same("warmup_frames"), "default only")],
        ("eval",): [*build, (worker, _same("index"))],
        ("score",): [(BuildConfig(), _same("batch_size")), (worker, _same("device", "index", "weights"))],
        ("bank", "calibrate"): [(worker, _same("device", "index", "weights"))],
        ("bank", "update"): [(worker, _same("device", "weights")), *connection],
        ("status",): connection, ("alarms",): connection, ("bank", "list"): connection,
        ("deadletter", "list"): connection, ("alarm", "dismiss"): connection, ("drift", "ack"): connection,
    }


def test_derived_options_have_the_settings_defaults_and_help():
    root = typer.main.get_command(app)
    for path, sources in derived_options().items():
        command = root
        for name in path:
            command = command.get_command(None, name)
        options = {opt: param for param in command.params for opt in param.opts}
        for settings, fields, *default_only in sources:
            for option, field_name in fields.items():
                assert option in options, (path, option)
                assert options[option].default == getattr(settings, field_name), (path, option)
                help_text = {f.name: f.metadata.get("help") for f in dataclasses.fields(settings)}[field_name]
                if help_text and not default_only:  # the help next to the default is the option's help
                    assert options[option].help == help_text, (path, option)


def test_a_required_field_is_a_required_option_and_bad_values_are_refused():
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", "--source", "synthetic"])
    assert result.exit_code == 2 and "--camera" in result.output
    result = runner.invoke(app, ["store", "--k", "4", "--n", "3", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2 and "k <= n" in result.output  # AlarmRule's own check, as a clear CLI error
    result = runner.invoke(app, ["store", "--drift-policy", "drop", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2 and "drift policy must be one of" in result.output  # DriftSettings' own check
    result = runner.invoke(app, ["console", "--port", "0"])
    assert result.exit_code == 2  # ConsoleSettings.port's range (field metadata)


SETTINGS_SOURCES = ["workers/settings.py", "ingest/camera.py", "store/service.py", "store/alarms/rules.py",
                    "runtime/deadletter.py", "runtime/status.py", "patchcore/up.py", "console/app.py",
                    "scorer/config.py", "scorer/features.py", "scorer/index.py", "scorer/calibration.py",
                    "scorer/views.py", "store/alarms/drift.py", "contracts/keys.py", "contracts/messages.py", "contracts/framecodec.py",
                    "workers/banks/registry.py", "sinks/service.py", "sinks/webhook.py", "sinks/mqtt.py",
                    "sinks/opcua.py", "sinks/deadletters.py"]


def _number(node):
    """A numeric literal's value (`8`, `10.0`, `16 << 20`, `7 * 86_400`), else None."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp):
        left, right = _number(node.left), _number(node.right)
        if left is not None and right is not None:
            ops = {ast.LShift: lambda a, b: a << b, ast.Mult: lambda a, b: a * b, ast.Add: lambda a, b: a + b}
            return ops[type(node.op)](left, right) if type(node.op) in ops else None
    return None


def _settings_numbers(path: Path) -> dict:
    """field or constant name -> numeric literal default, for the dataclass fields and module constants of a file."""
    found = {}
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
                value = next((k.value for k in value.keywords if k.arg == "default"), None)
            if value is not None and _number(value) is not None:
                found[node.target.id.lower()] = _number(value)
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and _number(node.value) is not None:
            found[node.targets[0].id.lower().removeprefix("default_")] = _number(node.value)
    return found


def test_no_settings_default_is_written_again_in_the_cli():
    """Every numeric default of a settings field or constant lives in its dataclass or module: no parameter default
    in patchcore/ (a CLI option, a helper) repeats it under the field's name (or the option's), and no CLI option's
    default (patchcore/cli.py, patchcore/commands/) is a number equal to a distinctive one (not 0 or 1)."""
    root = Path(__file__).resolve().parents[1]
    settings = {}
    for source in SETTINGS_SOURCES:
        settings.update(_settings_numbers(root / source))
    assert settings["claim_idle_ms"] == 30_000 and settings["max_frame_bytes"] == 16 << 20  # the scan reads them
    distinctive = {value for value in settings.values() if value not in (0, 1)}
    aliases = {"coreset": "fraction", "neighbours": "reweight_neighbours", "frames": "max_frames",
               "keep": "keep_versions", "after_s": "prune_after_s"}
    repeated = []
    for path in sorted((root / "patchcore").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = [*zip(positional[len(positional) - len(args.defaults):], args.defaults),
                     *((a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)]
            for arg, default in pairs:
                value = _number(default)
                if value is None:
                    continue
                name = aliases.get(arg.arg, arg.arg).lower()
                cli = path.parent.name == "commands" or path.name in ("cli.py", "options.py")
                if settings.get(name) == value or (cli and value in distinctive):
                    repeated.append(f"{path.relative_to(root)}:{default.lineno} {node.name}({arg.arg}={value})")
    assert not repeated, "defaults written again (derive them from the settings, patchcore/options.py):\n" + \
        "\n".join(repeated)


def test_the_check_sees_a_default_written_twice(tmp_path):
    # the checker itself: a CLI-style parameter default repeating a settings field's number is found
    source = tmp_path / "cli.py"
    source.write_text("def worker(claim_idle_ms: int = 30000, max_frame_bytes: int = 16 << 20, progress=True): pass\n")
    tree = ast.parse(source.read_text())
    function = tree.body[0]
    values = [_number(d) for d in function.args.defaults]
    settings = _settings_numbers(Path(__file__).resolve().parents[1] / "workers/settings.py")
    assert values[:2] == [settings["claim_idle_ms"], 16 << 20] and values[2] is None


def test_status_and_the_services_beside_cameras_start_without_torch():
    """Each command's module loads when the command runs: status, ingest, store, console, alarms, rule, dead letters
    and the bank registry never import torch (patchcore/cli.py, patchcore/commands/)."""
    code = ("import sys\nfrom patchcore.cli import app\n"
            "for args in (['status', '--help'], ['ingest', '--help'], ['store', '--help'], ['console', '--help'],\n"
            "             ['alarms', '--help'], ['rule', '--help'], ['deadletter', 'list', '--help'],\n"
            "             ['bank', 'list', '--help'], ['alarm', 'dismiss', '--help'], ['drift', 'ack', '--help']):\n"
            "    try:\n        app(args)\n    except SystemExit as exc:\n        assert exc.code == 0, args\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
