"""A .gguf file asked through llama.cpp (llama-cpp-python), for `infopo generate` and `infopo chat`.

llama.cpp renders the chat template stored in the file and stops at its end-of-turn token, as Ollama and
llama-cli would: what is checked here is what those users get.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from infopo_cli.errors import ConfigError, ModelError
from infopo_cli.inference.generation import Messages, Reply, Sampling

EXTRA = "pip install 'infopo[gguf-check]'"


def trained_context(path: Path) -> int | None:
    """The context length the file's model was trained with (its `<arch>.context_length`), if it says."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields.values()
    except (ValueError, OSError):
        return None  # llama.cpp itself reports what is wrong with the file
    return next((int(f.contents()) for f in fields if f.name.endswith(".context_length")), None)


class GgufModel:
    def __init__(self, path: Path, n_ctx: int = 4096) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise ConfigError(f"{path}: reading a GGUF file needs llama.cpp: {EXTRA}") from None
        import llama_cpp.llama as high_level

        # As export.check.LlamaCppReader: llama.cpp's weight repacking crashes on some AMX CPUs; plain weights run.
        default = llama_cpp.llama_model_default_params

        def without_repacking():
            params = default()
            params.use_extra_bufts = False
            return params

        trained = trained_context(path)
        n_ctx = min(n_ctx, trained) if trained else n_ctx  # beyond it a model degrades (and llama.cpp warns)
        high_level.llama_cpp.llama_model_default_params = without_repacking
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"{path}: llama.cpp cannot load it: {str(err).strip() or type(err).__name__}") from None
        finally:
            high_level.llama_cpp.llama_model_default_params = default
        self.name = str(path)

    def _options(self, sampling: Sampling) -> dict:
        return {"max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": sampling.top_k, "seed": sampling.seed}

    def reply(self, messages: Messages, sampling: Sampling = Sampling()) -> Reply:
        out = self.llm.create_chat_completion(messages=messages, **self._options(sampling))
        choice = out["choices"][0]
        return Reply(choice["message"]["content"] or "", int(out["usage"]["completion_tokens"]),
                     choice["finish_reason"] == "stop")

    def stream(self, messages: Messages, sampling: Sampling = Sampling()) -> Iterator[str]:
        for chunk in self.llm.create_chat_completion(messages=messages, stream=True, **self._options(sampling)):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def close(self) -> None:
        self.llm.close()
