"""After an export: does the GGUF answer like the merged model, and does it stop?

The most common complaint about other tools' exports is a model that never stops or answers
differently in llama.cpp/Ollama. We load the GGUF back (transformers reads GGUF; llama.cpp itself when
`llama-cpp-python` is installed), compare next-token logits and greedy generations with the merged
model on a few chat prompts, and check that generation ends with EOS or the end-of-turn token.

A lossless file (f32, f16, bf16) must answer exactly as the merged model. A quantised one (q8_0 and
below) may rightly pick another token at a near-tie, so there the file is checked against itself:
llama.cpp must tokenise like the tokenizer and answer as transformers does reading the same file, and
its answers must stop; agreement with the merged model is reported, not required.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Short-answer prompts: the check is about the export (layout, tokenizer, stopping), and long free-form
# generations diverge at the first near-tie whatever the format once weights are quantised.
PROMPTS = ("What is 2 + 3?", "Name the capital of France.", "How many legs does a cat have?")


@dataclass
class CheckResult:
    max_logit_diff: float = 0.0
    agree: list[bool] = field(default_factory=list)     # same greedy tokens, per prompt
    stops: list[bool] = field(default_factory=list)     # the merged model's generation ended, per prompt
    samples: list[str] = field(default_factory=list)
    llama_cpp: list[bool] | None = None                 # llama.cpp: same tokens, top-1 and greedy answer, per prompt
    transformers_checked: bool = True                   # False for rope-scaled models, which transformers reads unscaled
    lossy: bool = False                                 # quantised: `agree` is reported, `llama_cpp` is against the file

    @property
    def ok(self) -> bool:
        verified = self.transformers_checked or self.llama_cpp is not None
        return verified and (self.lossy or all(self.agree)) and all(self.stops) and all(self.llama_cpp or [])


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids - {None}


def prompt_text(tokenizer, prompt: str) -> tuple[str, bool]:
    """(text to tokenise, whether the tokenizer adds its special tokens such as BOS itself)."""
    if tokenizer.chat_template:  # the template writes BOS and the turn markers
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True), False
    return prompt, True


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    text, add_special = prompt_text(tokenizer, prompt)
    return torch.tensor([tokenizer(text, add_special_tokens=add_special)["input_ids"]])


@torch.no_grad()
def greedy(model, ids: torch.Tensor, stops: set[int], max_new_tokens: int) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(stops), pad_token_id=next(iter(stops)))
    return out[0, ids.shape[1]:].tolist()


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def compare(merged, tokenizer, gguf_path: Path, prompts=PROMPTS, max_new_tokens: int = 48,
            lossy: bool = False) -> CheckResult:
    from infopo_cli.export.gguf import rope_scaling

    stops, merged = stop_ids(tokenizer), merged.float().eval()
    # transformers reads GGUF rope scaling for gpt-oss only, so a rope-scaled export can only be checked in llama.cpp
    result = CheckResult(transformers_checked=rope_scaling(merged.config).get("rope_type") in (None, "default"),
                         lossy=lossy)
    exported = load_gguf(gguf_path) if result.transformers_checked else None
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        a = greedy(merged, ids, stops, max_new_tokens)
        answer = a  # what the file itself says, where transformers can read it
        if exported is not None:
            diff = (merged(ids).logits[0, -1] - exported(ids).logits[0, -1]).abs().max()
            result.max_logit_diff = max(result.max_logit_diff, float(diff))
            b = greedy(exported, ids, stops, max_new_tokens)
            result.agree.append(a == b)
            answer = b if lossy else a
        result.stops.append(bool(answer) and answer[-1] in stops)
        result.samples.append(tokenizer.decode(answer, skip_special_tokens=True))
    if importlib.util.find_spec("llama_cpp") is not None:
        reference = exported if lossy and exported is not None else merged
        result.llama_cpp = check_llama_cpp(reference, tokenizer, gguf_path, prompts, max_new_tokens)
    return result


def _llama_without_repacking(gguf_path: Path):
    """llama.cpp with its weight repacking ("extra buffer types") off.

    On this project's AMX CPUs, llama.cpp 0.3.36's repacked Q8_0 kernels crash in decode (SIGSEGV) on any
    Q8_0 tensor; without repacking the same file runs. We check the file, not that kernel; users on such
    CPUs can pass llama.cpp's `--no-repack`. llama-cpp-python does not expose the switch, so the default
    model parameters are wrapped for the duration of the load.
    """
    import llama_cpp
    import llama_cpp.llama as high_level

    default = llama_cpp.llama_model_default_params

    def without_repacking():
        params = default()
        params.use_extra_bufts = False
        return params

    high_level.llama_cpp.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, verbose=False, seed=0)
    finally:
        high_level.llama_cpp.llama_model_default_params = default


@torch.no_grad()
def check_llama_cpp(merged, tokenizer, gguf_path: Path, prompts=PROMPTS, max_new_tokens: int = 48) -> list[bool]:
    """llama.cpp itself loads the GGUF: same prompt tokens, same next-token choice, same greedy answer as `merged`
    (the merged model, or for a quantised file transformers reading that same file)."""
    llm = _llama_without_repacking(gguf_path)
    stops, results = stop_ids(tokenizer), []
    try:
        for prompt in prompts:
            text, add_special = prompt_text(tokenizer, prompt)
            ids = prompt_ids(tokenizer, prompt)
            same_tokens = llm.tokenize(text.encode(), add_bos=add_special, special=True) == ids[0].tolist()
            want = greedy(merged, ids, stops, max_new_tokens)
            got = []
            llm.reset()
            for token in llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                got.append(token)
                if token in stops or len(got) >= max_new_tokens:
                    break
            results.append(same_tokens and got[:1] == want[:1] and got == want)
    finally:
        llm.close()
    return results
