"""Text that the project did not write, available on every machine without a download.

* ``stdlib_sources``: the Python standard library's own ``.py`` files (code).
* ``natural_language_text``: the prose of the Python Language Reference shipped in
  ``pydoc_data.topics`` (English text).
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Directories that hold tests, generated tables or vendored third-party code rather than
# ordinary library source.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "ensurepip"}


@dataclass(frozen=True)
class SourceFile:
    name: str  # path relative to the stdlib root, e.g. "json/decoder.py"
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_paths(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, skipping tests and vendored code."""
    root = root or stdlib_root()
    paths = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        paths.append(path)
    return paths


def stdlib_sources(
    num_files: int | None = None, seed: int = 0, min_chars: int = 2000, max_chars: int = 200_000
) -> list[SourceFile]:
    """Standard-library source files; with ``num_files``, a seeded random choice of them."""
    root = stdlib_root()
    paths = stdlib_source_paths(root)
    if num_files is not None:
        rng = random.Random(seed)
        rng.shuffle(paths)
    files: list[SourceFile] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not min_chars <= len(text) <= max_chars:
            continue
        files.append(SourceFile(str(path.relative_to(root)), text))
        if num_files is not None and len(files) >= num_files:
            break
    return files


def natural_language_text(max_chars: int | None = None) -> str:
    """English prose: the Python Language Reference topics bundled with the interpreter."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return text if max_chars is None else text[:max_chars]


def corpus_text(name: str, max_chars: int | None = None, seed: int = 0) -> str:
    """A named corpus as one string: ``stdlib`` (code), ``prose`` (English) or a file path."""
    if name == "stdlib":
        parts: list[str] = []
        total = 0
        for f in stdlib_sources(num_files=None if max_chars is None else 400, seed=seed):
            parts.append(f.text)
            total += len(f.text)
            if max_chars is not None and total >= max_chars:
                break
        text = "\n\n".join(parts)
    elif name == "prose":
        text = natural_language_text()
    else:
        path = Path(name)
        if not path.is_file():
            from soarllm.errors import InvalidRequestError

            raise InvalidRequestError(
                f"corpus {name!r} is neither 'stdlib', 'prose' nor an existing file"
            )
        text = path.read_text(encoding="utf-8", errors="replace")
    return text if max_chars is None else text[:max_chars]
