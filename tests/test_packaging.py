"""A wheel of the plugin works outside the repository: its yaml defaults travel with it and are in force."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PARTS = ["recbole_darec", "properties", "setup.cfg", "pyproject.toml", "README.md"]

PRINT_PROTOCOL = """
import json, recbole_darec
from recbole_darec.config import Config
config = Config(model="SASRec", dataset="ml-100k")
print(json.dumps({"package": recbole_darec.__file__, "eval_args": config["eval_args"], "topk": config["topk"],
                  "valid_metric": config["valid_metric"], "epochs": config["epochs"],
                  "loss_type": config["loss_type"], "train_neg_sample_args": config["train_neg_sample_args"]}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for part in SOURCE_PARTS:
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy2
        copy(ROOT / part, source / part, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / part).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("recbole_darec-*.whl")
    return built


def test_wheel_holds_every_module_and_every_yaml(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "recbole_darec").rglob("*.py")}
    yamls = {"recbole_darec/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "properties").rglob("*.yaml")}
    assert modules - names == set()  # a subpackage missing from setup.cfg's package list fails here
    assert yamls - names == set()


def test_wheel_in_a_fresh_venv_run_elsewhere_uses_the_plugin_protocol(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # The dependencies (recbole, torch, ...) from this test's environment; this checkout's editable install is not
    # seen (a path added by a .pth file does not run that folder's own .pth files).
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([str(python), "-c", PRINT_PROTOCOL], cwd=elsewhere, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])

    assert Path(printed["package"]).is_relative_to(site)  # the wheel's copy, not the checkout
    overall = yaml.safe_load((ROOT / "properties" / "overall.yaml").read_text())
    sequential = yaml.safe_load((ROOT / "properties" / "sequential.yaml").read_text())
    # RecBole's own defaults differ on each of these (RS 8:1:1, topk [10], MRR@10, 300 epochs).
    assert printed["eval_args"]["split"] == overall["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert printed["topk"] == overall["topk"] == [10, 50]
    assert printed["valid_metric"] == overall["valid_metric"] == "NDCG@10"
    assert printed["epochs"] == overall["epochs"]
    assert printed["loss_type"] == sequential["loss_type"]


def test_missing_settings_fail_loudly(tmp_path):
    """A package whose yaml files were lost (a broken install) stops with what to do, instead of evaluating with
    RecBole's defaults."""
    shutil.copytree(ROOT / "recbole_darec", tmp_path / "recbole_darec", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "recbole_darec" / "properties").mkdir()  # present, but empty
    proc = subprocess.run([sys.executable, "-c", "import recbole_darec.config"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "overall.yaml not found" in proc.stderr and "Reinstall" in proc.stderr


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside a function (issue 38: a lazy import hides a
    circle, it does not remove it). A submodule's implicit import of its parent package is not counted: Python runs
    the parent's __init__ first whoever imports the submodule."""
    package = ROOT / "recbole_darec"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from its own package upwards
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*anchor, base] if base else anchor)
                imported.add(base)
                imported.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _package_imports()
    assert "recbole_darec.errors" in graph and not graph["recbole_darec.errors"]  # the bottom layer

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [[start]], {start}
        while stack:
            path = stack.pop()
            for nxt in sorted(graph[path[-1]]):
                if nxt == goal:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append([*path, nxt])
        return None

    circles = [circle for module in sorted(graph) if (circle := reaches(module, module))]
    assert not circles, " ; ".join(" -> ".join(circle) for circle in circles)
