"""The one-way import rule, read from the code itself (docs/architecture.md explains it; this is where it lives).

Each package may import only the packages listed for it; nothing imports upward or sideways. The processes that
run beside cameras and Redis (ingest, store, console) and the shared layers stay free of torch.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> project packages (or modules) it may import; the order is the layering, bottom first
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "scorer": (),  # pure compute: knows nothing of Redis, messages or processes
    "contracts": (),  # messages, keys and the frame codec: what crosses a process boundary
    "runtime": ("contracts",),  # the Redis runtime every process shares
    "ingest": ("contracts", "runtime"),
    "store": ("contracts", "runtime"),
    "sinks": ("contracts", "runtime"),  # verdicts and alarms delivered to webhooks, MQTT, OPC UA
    "workers": ("contracts", "runtime", "scorer"),
    "console": ("contracts", "runtime", "store", "workers.banks.registry"),
    "patchcore": ("contracts", "runtime", "scorer", "ingest", "store", "sinks", "workers", "console"),
}
TORCH_FREE = ("contracts.messages", "contracts.framecodec", "runtime.status", "runtime.health", "ingest.camera",
              "ingest.sources", "store.service", "store.alarms.log", "store.alarms.feed", "store.alarms.dismiss",
              "workers.banks.registry", "console.app",
              "sinks.service", "sinks.deadletters", "sinks.webhook", "sinks.mqtt", "sinks.opcua", "patchcore.commands.sink")


def project_imports(path: Path) -> set[str]:
    """Every project module a file imports (absolute names; relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
    return {name for name in names if name.split(".")[0] in MAY_IMPORT}


def allowed(importer: str, imported: str) -> bool:
    own = importer.split(".")[0]
    if imported.split(".")[0] == own:
        return True
    return any(imported == rule or imported.startswith(rule + ".") for rule in MAY_IMPORT[own])


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        importer = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        wrong += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(project_imports(path))
                  if not allowed(importer, name)]
    assert not wrong, "\n".join(wrong)


def test_the_rule_sees_a_wrong_import(tmp_path):
    # the checker itself: an upward import is caught, a relative import inside the package is not
    assert not allowed("store.service", "workers.worker")
    assert not allowed("scorer.model", "contracts.keys")
    assert allowed("store.service", "store.alarms.rules")
    assert allowed("console.app", "workers.banks.registry") and not allowed("console.app", "workers.banks.cache")


def test_processes_beside_cameras_and_redis_do_not_load_torch():
    code = ("import importlib, sys\n"
            f"for m in {TORCH_FREE!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
