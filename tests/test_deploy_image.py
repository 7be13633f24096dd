"""deploy/Dockerfile's build context and COPY steps reproduced on this machine (no container runtime or base image
needed): the files .dockerignore lets into the context and the Dockerfile copies in must make an installable
project holding every package pyproject.toml lists; its dependency layer must install the [onnx] extra, which the
CPU's default backbone engine needs."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

from .conftest import ROOT


def ignore_rules() -> list[tuple[bool, str]]:
    """.dockerignore as (excluded, pattern) in file order; the last matching rule decides (Docker's reading)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((not line.startswith("!"), line.lstrip("!")))
    return rules


def in_context(relative: str, rules: list[tuple[bool, str]]) -> bool:
    """Whether the build context holds `relative` (a path under the repository root, '/'-separated)."""
    parts = relative.split("/")
    included = True
    for excluded, pattern in rules:
        # a pattern matches the path or one of its parent folders; "**/x" matches x at any depth
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(pattern == "**" or fnmatch.fnmatch(p, pattern) or
               (pattern.startswith("**/") and fnmatch.fnmatch(p.split("/")[-1], pattern[3:])) for p in prefixes):
            included = not excluded
    return included


def copied_sources() -> list[str]:
    """The sources of the Dockerfile's `COPY SRC... DST` steps (the project's files, in order)."""
    sources = []
    for line in (ROOT / "deploy/Dockerfile").read_text().splitlines():
        match = re.match(r"COPY\s+(?!--)(.+)\s+\S+$", line.strip())
        if match:
            sources += match.group(1).split()
    return sources


def test_the_image_holds_every_package_pyproject_installs(tmp_path):
    rules = ignore_rules()
    context = tmp_path / "app"
    for source in copied_sources():
        path = ROOT / source
        assert in_context(source, rules), f".dockerignore keeps {source} (a COPY source) out of the build context"
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if in_context(relative, rules):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, context / relative)
    # the image's `pip install --no-deps .`, as a wheel: fails if a listed package's folder is missing
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "wheel"), str(context)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        folder = package.replace(".", "/") + "/"  # console.static is a data folder (no __init__.py)
        assert any(name.startswith(folder) for name in names), f"the image's install lacks {package}"
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


def test_a_package_left_out_of_the_context_is_caught():
    rules = ignore_rules()
    assert in_context("scorer/model.py", rules) and in_context("sinks/mqtt.py", rules)
    assert not in_context("tests/conftest.py", rules) and not in_context(".venv/bin/python", rules)
    assert not in_context("scorer/__pycache__/model.cpython-311.pyc", rules)
    assert not in_context("sinks/mqtt.py", [rule for rule in rules if rule[1] != "sinks"])


def test_the_dependency_layer_installs_the_onnx_extra(tmp_path):
    """The Dockerfile's requirements step, run as written: the [onnx] extra is in the image's dependencies."""
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    command = re.search(r'python3 -c "(import tomllib.*?)" > /tmp/requirements.txt', dockerfile).group(1)
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    listed = subprocess.run([sys.executable, "-c", command], cwd=tmp_path, capture_output=True, text=True,
                            check=True).stdout.split("\n")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["dependencies"]) | set(project["optional-dependencies"]["onnx"]) <= set(listed)
    assert any(line.startswith("onnxruntime") for line in listed)
