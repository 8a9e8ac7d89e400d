"""A real `fermi serve` process on loopback for the server tests, and a
Qwen3-style chat template to run thinking on/off/auto on the embedded model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MODEL = "smollm2-135m"

# Qwen3's template logic on ChatML: past assistant turns lose their reasoning,
# thinking off closes an empty think block. Unlike Qwen3's own, thinking on opens
# the block in the prompt (as Qwen3-Thinking's does), so a model that never
# thinks by itself still produces reasoning the server must route.
QWEN3_STYLE = """\
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'system' or m.role == 'user' -%}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}
{%- elif m.role == 'assistant' -%}
{%- set content = m.content or '' -%}
{%- set reasoning = '' -%}
{%- if m.reasoning_content is defined and m.reasoning_content is not none -%}
{%- set reasoning = m.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
{%- endif -%}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '<think>\\n\\n</think>\\n\\n' -}}
{%- else -%}
{{- '<think>\\n' -}}
{%- endif -%}
{%- endif -%}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fermi serve --model smollm2-135m` (or `model`) in a subprocess; its stderr (the request
    log) goes to a file the tests can read."""

    def __init__(self, *args: str, backend: str = "torch", env: dict | None = None, template: str | None = None,
                 model: str = MODEL):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dir = tempfile.TemporaryDirectory(prefix="fermi-serve-")
        self.log_path = Path(self.dir.name) / "stderr.log"
        cmd = [sys.executable, "-m", "fermi.cli.main", "serve", "--model", model, "--backend", backend,
               "--port", str(self.port), *args]
        if template is not None:
            path = Path(self.dir.name) / "template.jinja"
            path.write_text(template)
            cmd += ["--chat-template", str(path)]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log_file,
                                     env={**environ, "FERMI_OFFLINE": "1", **(env or {})})

    def url(self, path: str) -> str:
        return self.base + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> "Server":
        """Poll /health: refused before the port is bound, 503 while the model loads."""
        deadline = time.monotonic() + timeout
        seen = set()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fermi serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.url("/health"), timeout=5)
                seen.add(r.status_code)
                if r.status_code == 200:
                    self.health_seen = seen
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"fermi serve was not ready in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        self.dir.cleanup()
