"""Code versions: which edits make a benchmark row stale."""

import shutil

import pytest

from recbole_darec import config, provenance


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    package = tmp_path / "recbole_darec"
    properties = tmp_path / "properties"
    shutil.copytree(provenance.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(config.PROPERTIES_DIR, properties)
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)
    monkeypatch.setattr(config, "PROPERTIES_DIR", properties)
    return package, properties


def _versions():
    return provenance.code_version(), provenance.code_version(plugin_models=False)


def test_plugin_model_files_leave_recbole_rows_current(package_copy):
    package, properties = package_copy
    before = _versions()
    (package / "model" / "darec.py").write_text("# edited\n", encoding="utf-8")
    with open(properties / "model" / "DARec.yaml", "a", encoding="utf-8") as f:
        f.write("new_setting: 1\n")
    after = _versions()
    assert after[0] != before[0]  # a DARec row goes stale
    assert after[1] == before[1]  # a SASRec row does not


@pytest.mark.parametrize("edited", ["trainer.py", "overall.yaml"])
def test_shared_files_make_every_row_stale(package_copy, edited):
    package, properties = package_copy
    before = _versions()
    path = package / edited if edited.endswith(".py") else properties / edited
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n# edited\n")
    after = _versions()
    assert after[0] != before[0] and after[1] != before[1]
