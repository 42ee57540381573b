"""After an export: does the GGUF answer like the merged model, and does it stop?

The most common complaint about other tools' exports is a model that never stops or answers
differently in llama.cpp/Ollama. We load the GGUF back (transformers reads GGUF; llama.cpp itself when
`llama-cpp-python` is installed) and read the merged model's greedy answers to a few chat prompts with it
(teacher forcing: every reader sees the same tokens, so one near-tie cannot derail the rest of an answer).

Rules. At each answer token the reader's top-1 must be the reference's, or a near tie: a token the reference
rates within `TIE` standard deviations of its logits below its own best (measured on the default model:
llama.cpp and transformers on the same quantised file differ at most by 0.36 logits at such ties, the margin
is ~0.9). A lossless file (f32, f16, bf16) must agree so with the merged model and its answers must stop where the merged
model's do (a base model without a chat template may run on: its file then may too).
A quantised one (q8_0 and below) is checked against itself: llama.cpp must tokenise like the tokenizer and
agree with transformers reading the same file; its agreement with the merged model is reported, and answers
that no longer stop are a warning (a coarse type for the model's size), not a broken file.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from infopo_cli.errors import ExportCheckFailed, InfopoError, first_line
from infopo_cli.inference.generation import stop_ids
from infopo_cli.model.embedded import quiet_gguf_loading
from infopo_cli.model.llama_runtime import load_llama
from infopo_cli.data.tokenization import render_chat
from infopo_cli.export.gguf import rope_scaling

# Short-answer prompts: the check is about the export (layout, tokenizer, stopping).
PROMPTS = ("What is 2 + 3?", "Name the capital of France.", "How many legs does a cat have?")
TIE = 0.25  # near-tie margin in standard deviations of the reference's logits at that position


@dataclass(frozen=True)
class Agreement:
    """Top-1 of a reader against a reference's, over the answer tokens."""

    same: int
    ties: int    # another top-1, at a near tie
    total: int

    @property
    def within_ties(self) -> bool:
        return self.same + self.ties == self.total

    def __str__(self) -> str:
        return f"{self.same}/{self.total}" + (f" (+{self.ties} near ties)" if self.ties else "")


def agreement(reference: torch.Tensor, reader: torch.Tensor, tie: float = TIE) -> Agreement:
    """`reference`, `reader`: [positions, vocab] logits at the same tokens."""
    reference, reader = reference.float(), reader.float()
    best, picked = reference.max(-1).values, reader.argmax(-1)
    same = picked == reference.argmax(-1)
    below = best - reference.gather(-1, picked[:, None])[:, 0]
    ties = ~same & (below <= tie * reference.std(-1))
    return Agreement(int(same.sum()), int(ties.sum()), len(same))


@dataclass
class PromptCheck:
    """The check of one prompt: the file's greedy answer, whether it stops, and how each reader agreed."""

    prompt: str
    answer: str                          # the file's own greedy answer (the merged model's where transformers cannot read it)
    stops: bool                          # that answer ended with EOS or the end-of-turn token
    vs_merged: Agreement | None = None   # transformers reading the file, on the merged model's answer
    llama_cpp: Agreement | None = None   # llama.cpp on the same tokens, against the reference (see module docstring)
    llama_cpp_tokens: bool = True        # llama.cpp tokenised the prompt as the tokenizer does
    merged_stops: bool = True            # the merged model's own answer did (a base model's may run on: not the file's fault)


@dataclass
class CheckResult:
    """The reload check of one exported file: every prompt's result, and what could be checked at all."""

    quant: str = "f16"
    lossy: bool = False                  # quantised: checked against itself, agreement with merged reported
    transformers_checked: bool = True    # False for rope-scaled models, which transformers reads unscaled
    prompts: list[PromptCheck] = field(default_factory=list)
    max_logit_diff: float = 0.0          # transformers reading the file vs merged, over all answer tokens
    llama_cpp_checked: bool = False
    llama_cpp_stop: bool = True          # llama.cpp's EOS is one of the tokenizer's stop tokens
    max_new_tokens: int = 48

    @property
    def llama_cpp_reference(self) -> str:
        return "transformers reading the same file" if self.lossy and self.transformers_checked else "the merged model"

    def problems(self) -> list[str]:
        """What makes the file broken, one line each; empty when it passed."""
        found = []
        if not self.transformers_checked and not self.llama_cpp_checked:
            found.append("a rope-scaled export needs llama.cpp to be checked (pip install 'infopo[gguf-check]')")
        if not self.lossy and not all(p.vs_merged is None or p.vs_merged.within_ties for p in self.prompts):
            found.append("answers differently from the merged model")
        if not self.lossy and not all(p.stops or not p.merged_stops for p in self.prompts):
            found.append("generation does not stop")
        if self.llama_cpp_checked:
            if not all(p.llama_cpp_tokens for p in self.prompts):
                found.append("llama.cpp tokenises the prompts differently")
            if not all(p.llama_cpp is not None and p.llama_cpp.within_ties for p in self.prompts):
                found.append(f"llama.cpp answers differently from {self.llama_cpp_reference}")
            if not self.llama_cpp_stop:
                found.append("llama.cpp's end-of-sequence token is not the model's stop token")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def warnings(self) -> list[str]:
        """What is worth saying about a lossy file that still passed (answers that no longer stop)."""
        rambling = sum(not p.stops and p.merged_stops for p in self.prompts)
        if self.lossy and rambling:
            return [f"{rambling} of {len(self.prompts)} answers of the {self.quant} file do not stop within "
                    f"{self.max_new_tokens} tokens: {self.quant} is coarse for a model of this size (a larger type keeps more)"]
        return []

    def lines(self) -> list[str]:
        """What `infopo export` prints about the check."""
        out = []
        for p in self.prompts:
            vs = f"top-1 as merged {p.vs_merged}, " if p.vs_merged is not None else "merged model, "
            ending = "stops" if p.stops else "DOES NOT STOP" if p.merged_stops else "runs on, as the merged model does"
            out.append(f"  {p.prompt!r} -> {p.answer!r}  [{vs}{ending}]")
        if self.transformers_checked:
            out.append(f"  max logit difference vs merged over the answers: {self.max_logit_diff:.4f}")
        else:
            out.append("  rope-scaled model: transformers cannot read its scaling back; checked in llama.cpp only")
        if not self.llama_cpp_checked:
            out.append("  llama.cpp check skipped: pip install 'infopo[gguf-check]' (compiles llama.cpp, ~7 min)")
        else:
            good = sum(p.llama_cpp_tokens and p.llama_cpp is not None and p.llama_cpp.within_ties for p in self.prompts)
            tokens = ", ".join(str(p.llama_cpp) for p in self.prompts)
            out.append(f"  llama.cpp: {good}/{len(self.prompts)} prompts with the same tokens and top-1 as "
                       f"{self.llama_cpp_reference} (answer tokens {tokens})")
        return out + [f"  warning: {w}" for w in self.warnings()]


def prompt_text(tokenizer, prompt: str) -> tuple[str, bool]:
    """(text to tokenise, whether the tokenizer adds its special tokens such as BOS itself)."""
    if tokenizer.chat_template:  # the template writes BOS and the turn markers
        return render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True), False
    return prompt, True


def prompt_tensor(tokenizer, prompt: str) -> torch.Tensor:
    """`prompt` as the check reads it: a (1, n) tensor of token ids, chat template applied where there is one."""
    text, add_special = prompt_text(tokenizer, prompt)
    return torch.tensor([tokenizer(text, add_special_tokens=add_special)["input_ids"]])


@torch.no_grad()
def greedy(model, ids: torch.Tensor, stops: set[int], max_new_tokens: int) -> list[int]:
    """The greedy answer's token ids (the prompt cut off), ending at a stop token or after `max_new_tokens`."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(stops), pad_token_id=next(iter(stops)))
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def answer_logits(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """[len(answer), vocab]: the logits that predict each answer token, reading prompt + answer."""
    return model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].float()


def load_gguf(path: Path):
    """transformers' own reading of the GGUF file (de-quantised to float32), for comparing with the merged model."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with quiet_gguf_loading():
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                    trust_remote_code=False).eval()


@torch.no_grad()
def compare(merged, tokenizer, gguf_path: Path, prompts=PROMPTS, max_new_tokens: int = 48,
            lossy: bool = False, quant: str = "f16", shown: Path | None = None) -> CheckResult:
    """Check `gguf_path` against the merged model that was exported: the greedy answers to `prompts` read by
    transformers and, where installed, by llama.cpp. `shown`: the file's name in messages (where the file checked is
    a temporary that takes that name)."""
    stops, merged = stop_ids(tokenizer), merged.float().eval()
    # transformers reads GGUF rope scaling for gpt-oss only, so a rope-scaled export can only be checked in llama.cpp
    result = CheckResult(quant=quant, lossy=lossy, max_new_tokens=max_new_tokens,
                         transformers_checked=rope_scaling(merged.config).get("rope_type") in (None, "default"))
    exported = load_gguf(gguf_path) if result.transformers_checked else None
    llama = (LlamaCppReader(gguf_path, context_of(merged), shown=shown)
             if importlib.util.find_spec("llama_cpp") is not None else None)
    try:
        for prompt in prompts:
            ids = prompt_tensor(tokenizer, prompt)
            prompt_tokens, answer = ids[0].tolist(), greedy(merged, ids, stops, max_new_tokens)
            reference = merged_logits = answer_logits(merged, prompt_tokens, answer)
            own, check = answer, PromptCheck(prompt, "", False, merged_stops=bool(answer) and answer[-1] in stops)
            if exported is not None:
                file_logits = answer_logits(exported, prompt_tokens, answer)
                result.max_logit_diff = max(result.max_logit_diff, float((file_logits - merged_logits).abs().max()))
                check.vs_merged = agreement(merged_logits, file_logits)
                own = greedy(exported, ids, stops, max_new_tokens)
                reference = file_logits if lossy else merged_logits
            check.answer, check.stops = tokenizer.decode(own, skip_special_tokens=True), bool(own) and own[-1] in stops
            if llama is not None:
                check.llama_cpp_tokens = llama.tokenize(tokenizer, prompt) == prompt_tokens
                check.llama_cpp = agreement(reference, llama.answer_logits(prompt_tokens, answer))
            result.prompts.append(check)
        if llama is not None:
            result.llama_cpp_checked, result.llama_cpp_stop = True, llama.eos() in stops
    finally:
        if llama is not None:
            llama.close()
    return result


def context_of(model, wanted: int = 1024) -> int:
    """llama.cpp's context for the check: enough for prompt + answer, never past what the model was built for."""
    return min(wanted, getattr(model.config, "max_position_embeddings", None) or wanted)


Result = TypeVar("Result")


def before_naming(check: Callable[[], Result], out: Path) -> tuple[Result | None, ExportCheckFailed | None]:
    """Run the check of a written file that does not have its name `out` yet: its result, or the failure to raise once
    the file has its name. A file llama.cpp cannot load, or a check that cannot run (out of memory, say), still leaves
    the file, named, for inspection; only a stop (Ctrl-C) leaves nothing, so the same command runs again."""
    try:
        return check(), None
    except ExportCheckFailed as err:
        return None, err
    except InfopoError:  # the user's input (a base GGUF it cannot read): one line, exit 2, nothing left to rerun over
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the check itself; the chain keeps it for --debug
        failed = ExportCheckFailed(f"the check could not run ({first_line(err)}); {out} is written, unchecked")
        failed.__cause__ = err
        return None, failed


class LlamaCppReader:
    """llama.cpp itself on the GGUF (llama-cpp-python), loaded as infopo loads it everywhere (model/llama_runtime.py:
    its weight repacking crashes on AMX CPUs). We check the file, not that kernel."""

    def __init__(self, gguf_path: Path, n_ctx: int = 1024, adapter: Path | None = None, shown: Path | None = None):
        """`shown`: the name of the file just written (the adapter's where one is given) in messages, its final path
        while a temporary file is read."""
        options = {"lora_path": str(adapter)} if adapter is not None else {}
        try:
            # swa_full=False: a sliding-window model's (Gemma's) cache sized to its window, which is right here as
            # every read starts from a reset (chat reuses a prefix: it keeps llama-cpp-python's full-size cache);
            # the full-size cache also prints a note past verbose=False
            self.llm = load_llama(gguf_path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=0, swa_full=False,
                                  **options)
        except (ValueError, RuntimeError) as err:  # the file infopo just wrote: a failed check, not the user's doing
            what = f"{gguf_path} with the adapter {shown or adapter}" if adapter is not None else shown or gguf_path
            raise ExportCheckFailed(f"check failed: llama.cpp cannot load {what} ({first_line(err)}); the file is "
                                    "kept for inspection") from None

    def tokenize(self, tokenizer, prompt: str) -> list[int]:
        """`prompt` tokenised by llama.cpp, with the template and special tokens the tokenizer uses."""
        text, add_special = prompt_text(tokenizer, prompt)
        return self.llm.tokenize(text.encode(), add_bos=add_special, special=True)

    def answer_logits(self, prompt: list[int], answer: list[int]) -> torch.Tensor:
        """[len(answer), vocab]: llama.cpp's logits that predict each answer token, reading prompt + answer."""
        self.llm.reset()
        self.llm.eval(prompt + answer)
        return torch.tensor(self.llm.scores[len(prompt) - 1:len(prompt) + len(answer) - 1], dtype=torch.float32)

    def eos(self) -> int:
        """The file's end-of-sequence token id as llama.cpp reads it."""
        return self.llm.token_eos()

    def close(self) -> None:
        self.llm.close()


@torch.no_grad()
def check_llama_cpp(reference, tokenizer, gguf_path: Path, prompts=PROMPTS, max_new_tokens: int = 48) -> list[bool]:
    """Per prompt: llama.cpp tokenises as the tokenizer and agrees (top-1 up to near ties) with `reference` on its
    greedy answer. For tests and ad-hoc checks of a file against any model."""
    stops, llama, results = stop_ids(tokenizer), LlamaCppReader(gguf_path, context_of(reference)), []
    try:
        for prompt in prompts:
            ids = prompt_tensor(tokenizer, prompt)
            prompt_tokens, answer = ids[0].tolist(), greedy(reference, ids, stops, max_new_tokens)
            agreed = agreement(answer_logits(reference, prompt_tokens, answer), llama.answer_logits(prompt_tokens, answer))
            results.append(llama.tokenize(tokenizer, prompt) == prompt_tokens and agreed.within_ties)
    finally:
        llama.close()
    return results
