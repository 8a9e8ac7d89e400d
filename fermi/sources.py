"""Model sources: a Hugging Face repo id, a local directory, a .gguf file, or the
embedded SmolLM2. Each resolves to a `ModelFiles`: config, tokenizer, chat
template and safetensors weights with Hugging Face names and layout."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import ModelConfig
from .errors import FermiError
from .tokenizer import Tokenizer


@dataclass
class ModelFiles:
    name: str  # what users see: repo id, directory name or GGUF file name
    path: Path  # the directory or the .gguf file
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: str | None
    generation_config: dict = field(default_factory=dict)
    gguf: Path | None = None  # the GGUF file, when the source is one
    _weights: Callable[[], list[Path]] | list[Path] = field(default_factory=list, repr=False)
    _gguf_model: object = field(default=None, repr=False)

    def gguf_model(self):
        """The parsed GGUF (fermi.gguf.GGUFModel) of a GGUF source: its tensors as
        they are stored, for a backend that keeps them quantized."""
        if self._gguf_model is None:
            from .gguf import open_gguf

            self._gguf_model = open_gguf(self.gguf)
        return self._gguf_model

    def weight_files(self) -> list[Path]:
        """Safetensors files (HF names and layout). For a GGUF, the dequantized
        float32 conversion, made on first use and kept in the cache directory."""
        if callable(self._weights):
            self._weights = self._weights()
        return self._weights


DEFAULT_MODEL = "Qwen/Qwen3-1.7B"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("FERMI_OFFLINE", "HF_HUB_OFFLINE"))


def resolve(spec: str | None = None, progress=None, notice: Callable[[str], None] | None = None) -> ModelFiles:
    """A model name as the user typed it -> ModelFiles. With no name (and no
    FERMI_MODEL), the default Qwen3 model, or the embedded model when the default
    can be neither found in the cache nor downloaded."""
    spec = spec or os.environ.get("FERMI_MODEL")
    if spec:
        return _resolve(spec, progress)
    try:
        return _resolve(DEFAULT_MODEL, progress)
    except FermiError as e:
        if notice:
            notice(f"{e}; running the embedded SmolLM2-135M-Instruct instead")
        return _resolve("smollm2-135m", progress)


def _resolve(spec: str, progress) -> ModelFiles:
    from . import embedded

    if spec in embedded.NAMES:
        return from_gguf(embedded.NAMES[spec](), progress, name=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return from_dir(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise FermiError(f"{path} is not a .gguf file or a model directory")
        return from_gguf(path, progress)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf"):
        return from_dir(_hub_download(spec, progress), name=spec)
    raise FermiError(f"no such model file or directory: {spec}")


def _hub_download(repo_id: str, progress) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline()))
    except LocalEntryNotFoundError:
        why = "offline mode is on" if offline() else "the Hugging Face hub cannot be reached"
        raise FermiError(f"model {repo_id} is not in the local Hugging Face cache and {why}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise FermiError(f"cannot download {repo_id}: {str(e).splitlines()[0]}") from None


def from_dir(path: Path, name: str | None = None) -> ModelFiles:
    config_file = path / "config.json"
    if not config_file.exists():
        raise FermiError(f"{path} has no config.json: not a model directory")
    config = ModelConfig.from_dict(_json(config_file))
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise FermiError(f"{path} has no *.safetensors weights")
    tokenizer = Tokenizer.from_dir(path, config.eos_ids)
    template = path / "chat_template.jinja"
    chat_template = template.read_text(encoding="utf-8") if template.exists() else None
    if chat_template is None:
        chat_template = _json(path / "tokenizer_config.json").get("chat_template")
    if isinstance(chat_template, list):  # several named templates: take the default
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    return ModelFiles(
        name=name or path.name,
        path=path,
        config=config,
        tokenizer=tokenizer,
        chat_template=chat_template,
        generation_config=_json(path / "generation_config.json"),
        _weights=weights,
    )


def from_gguf(path: Path, progress=None, name: str | None = None) -> ModelFiles:
    from .gguf import converted, describe

    if not path.is_file():
        raise FermiError(f"{path}: no such GGUF file")
    config, tokenizer, chat_template = describe(path)
    return ModelFiles(
        name=name or path.name,
        path=path,
        config=ModelConfig.from_dict(config),
        tokenizer=tokenizer,
        chat_template=chat_template,
        gguf=path,
        _weights=lambda: [converted(path, progress)],
    )


def _json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FermiError(f"{path} is not valid JSON: {e}") from None
