"""A .gguf file asked through llama.cpp (llama-cpp-python), for `infopo generate` and `infopo chat`.

llama.cpp renders the chat template stored in the file and stops at its end-of-turn token, as Ollama and
llama-cli would: what is checked here is what those users get.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

from infopo_cli.errors import ConfigError, ModelError
from infopo_cli.inference.generation import ContextFull, Messages, Reply, Sampling
from infopo_cli.model.llama_runtime import load_llama
from infopo_cli.model.source import read_gguf

EXTRA = "pip install 'infopo[gguf-check]'"


def trained_context(path: Path) -> int | None:
    """The context length the file's model was trained with (its `<arch>.context_length`), if it says. Read before
    llama.cpp loads the file, so a truncated or corrupt one is refused in one line naming it."""
    fields = read_gguf(path).fields.values()
    return next((int(f.contents()) for f in fields if f.name.endswith(".context_length")), None)


class GgufModel:
    """A GGUF file loaded in llama.cpp, answering chat messages as the transformers models do."""

    def __init__(self, path: Path, n_ctx: int = 4096) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError(f"{path}: reading a GGUF file needs llama.cpp: {EXTRA}")
        trained = trained_context(path)
        n_ctx = min(n_ctx, trained) if trained else n_ctx  # beyond it a model degrades (and llama.cpp warns)
        try:
            self.llm = load_llama(path, n_ctx=n_ctx, verbose=False)
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"{path}: llama.cpp cannot load it: {str(err).strip() or type(err).__name__}") from None
        self.name = str(path)

    def _options(self, sampling: Sampling) -> dict:
        if sampling.seed >= 2**32 - 1:  # llama.cpp's seed is 32 bits, and 2**32 - 1 means "a random one"
            raise ConfigError(f"--seed {sampling.seed}: llama.cpp takes seeds below {2**32 - 1} for a GGUF model")
        return {"max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": sampling.top_k, "seed": sampling.seed}

    def reply(self, messages: Messages, sampling: Sampling = Sampling()) -> Reply:
        """One whole reply to `messages`, with the file's chat template."""
        out = self.llm.create_chat_completion(messages=messages, **self._options(sampling))
        choice = out["choices"][0]
        return Reply(choice["message"]["content"] or "", int(out["usage"]["completion_tokens"]),
                     choice["finish_reason"] == "stop")

    def stream(self, messages: Messages, sampling: Sampling = Sampling()) -> Iterator[str]:
        """The reply to `messages` piece by piece, as llama.cpp produces it."""
        chunks = self.llm.create_chat_completion(messages=messages, stream=True, **self._options(sampling))
        try:
            for chunk in chunks:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        except ValueError as err:  # llama.cpp's "Requested tokens (N) exceed context window of C"
            if "context window" not in str(err):
                raise
            raise ContextFull(f"the conversation fills the model's context of {self.llm.n_ctx()} tokens") from None

    @property
    def context(self) -> int:
        """The positions llama.cpp was given for a prompt and its reply (n_ctx)."""
        return int(self.llm.n_ctx())

    def close(self) -> None:
        self.llm.close()
