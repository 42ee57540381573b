"""`infopo export --gguf-adapter`: write the adapter GGUF (export/adapter_gguf.py), the Ollama Modelfile that puts it on
its base GGUF, and check the pair in llama.cpp.

The base GGUF is the one the run trained from where there is one (the embedded default's own file, a `--model
FILE.gguf`), else `--base-gguf`. The check reads the same two files in llama.cpp and in transformers (the base GGUF
de-quantised, the adapter attached by peft): greedy answers must agree token by token up to near ties, as the merged
GGUF check asks (export/check.py), and the adapter must move llama.cpp's logits as it moves transformers' — an
adapter that loads but is misread (a transposed or unpermuted matrix, a wrong scale) barely changes the answers of
a lightly trained run, so agreement alone would pass it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infopo_cli import files
from infopo_cli.config import EMBEDDED_MODEL
from infopo_cli.errors import ConfigError
from infopo_cli.export.adapter_gguf import (LOSSLESS, adapter_file_bytes, adapter_tensors, check_base,
                                            lora_settings, read_back, write_adapter_gguf)
from infopo_cli.export.check import (PROMPTS, Agreement, LlamaCppReader, agreement, answer_logits, before_naming,
                                     context_of, greedy, load_gguf, prompt_tensor)
from infopo_cli.export.merged import AdapterSource
from infopo_cli.export.modelfile import modelfile, write_modelfile
from infopo_cli.export.outputs import claim_gguf
from infopo_cli.inference.generation import stop_ids

# The adapter's change to llama.cpp's logits against its change to transformers' (on the same tokens): their cosine,
# and the slope of one on the other. llama.cpp's own arithmetic (a quantised base's matmuls above all) adds noise,
# measured as llama.cpp's base logits against transformers' on the same tokens. The noise swamps the cosine of a small
# change (a 1- or 3-step adapter on the default model's Q4_1 base: 0.66-0.89 although right), so the cosine is judged
# only EFFECT_SIGNAL times above it; the slope stays near 1 far below that (0.75-0.97 at 0.2-2.3 times the noise), while
# an adapter read as zero gives 0 and one scaled twice over 1.9-2.0: it is judged down to EFFECT_FLOOR, in a wider band
# where the change is small. Not below it: on Gemma 3 270M's Q4_K_M base a right 2-step adapter at 0.4 times the noise
# gave a slope of 1.78 (llama.cpp's K-quant matmuls round their inputs too), while a 6-step one at 9.9 times gave 1.016.
EFFECT_SIGNAL = 3.0
EFFECT_FLOOR = 0.5
EFFECT_COSINE = 0.75
EFFECT_SLOPE = (0.8, 1.25)
EFFECT_SLOPE_NOISY = (0.5, 1.6)


@dataclass
class AdapterCheck:
    """base + adapter in llama.cpp against transformers reading the same files."""

    agreements: list[Agreement] = field(default_factory=list)
    tokens_same: list[bool] = field(default_factory=list)
    effect: float | None = None        # cosine of the two logit changes; None when too small against the noise
    slope: float | None = None         # llama.cpp's change regressed on transformers': 1 when the scale is right;
                                       # None when the change is below EFFECT_FLOOR times the noise
    signal: float = 0.0                # the size of transformers' change over llama.cpp's own noise
    answers: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        found = []
        if not all(self.tokens_same):
            found.append("llama.cpp tokenises the prompts differently")
        if not all(a.within_ties for a in self.agreements):
            found.append("llama.cpp with the adapter answers differently from the base with the adapter in transformers")
        band = EFFECT_SLOPE if self.effect is not None else EFFECT_SLOPE_NOISY
        cosine_off = self.effect is not None and not self.effect >= EFFECT_COSINE
        if self.slope is not None and (cosine_off or not band[0] <= self.slope <= band[1]):
            cosine = f"cosine {self.effect:.2f}, at least {EFFECT_COSINE}; " if self.effect is not None else ""
            found.append(f"the adapter moves llama.cpp's logits unlike transformers' ({cosine}slope {self.slope:.2f}, "
                         f"within {band[0]}-{band[1]})")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def lines(self) -> list[str]:
        out = [f"  {prompt!r} -> {answer!r}  [llama.cpp top-1 {agreed}]"
               for prompt, answer, agreed in zip(PROMPTS, self.answers, self.agreements)]
        if self.slope is None:
            effect = (f"the adapter's change to the logits is {self.signal:.2f} times llama.cpp's own noise: too small "
                      "to compare")
        else:
            cosine = f"cosine {self.effect:.3f}, " if self.effect is not None else ""
            effect = (f"the adapter's change to llama.cpp's logits against transformers': {cosine}slope {self.slope:.3f} "
                      f"({self.signal:.1f} times llama.cpp's own noise"
                      + (f"; the cosine needs {EFFECT_SIGNAL:g})" if self.effect is None else ")"))
        return out + [f"  {effect}"]


def default_base_gguf(base: str) -> Path | None:
    """The GGUF the run's base came from: the embedded default's file, or a `--model FILE.gguf`."""
    if base == EMBEDDED_MODEL:
        from infopo_cli.model.embedded import find_gguf

        return find_gguf()
    return Path(base) if base.lower().endswith(".gguf") and Path(base).is_file() else None


def export_adapter(source: AdapterSource, out: Path, quant: str = "f16", base_gguf: Path | None = None,
                   overwrite: bool = False, check: bool = True, log: Callable[[str], None] = print
                   ) -> tuple[Path, Path | None, AdapterCheck | None]:
    """Write OUT.gguf (the adapter) and, with a base GGUF, OUT.Modelfile; with `check` and llama.cpp installed, load
    the pair in llama.cpp and compare. Returns the paths and the check (None when not run)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from infopo_cli.export.gguf import arch_for
    from infopo_cli.model.stack import resolve_source

    if quant not in LOSSLESS:
        raise ConfigError(f"--gguf-adapter writes {', '.join(LOSSLESS)} (got --quant {quant}): its matrices are a few "
                          "MiB and their rank-wide rows do not divide into quantisation blocks")
    base_gguf = base_gguf or default_base_gguf(source.base)
    if base_gguf is not None and not base_gguf.is_file():
        raise ConfigError(f"--base-gguf {base_gguf}: no such file")
    claim_gguf(out, overwrite, "--gguf-adapter", reads=[base_gguf] if base_gguf is not None else [])
    settings = lora_settings(source.adapter)
    config = AutoConfig.from_pretrained(resolve_source(source.base, log=log), trust_remote_code=False)
    arch = arch_for((config.architectures or [type(config).__name__])[0], config)
    tensors = adapter_tensors(load_file(str(source.adapter / "adapter_model.safetensors")), settings, config, arch)
    if base_gguf is not None:
        check_base(base_gguf, tensors, arch)
    size = adapter_file_bytes(source.adapter, quant)
    files.check_free_space(out.parent, size)
    log(f"writing the {quant} adapter GGUF, {len(tensors)} adapted weights, about {size / 2**20:,.1f} MiB")
    tokenizer, text = None, None
    if base_gguf is not None:
        from infopo_cli.model.stack import load_tokenizer

        tokenizer = load_tokenizer(str(source.adapter if (source.adapter / "tokenizer_config.json").is_file()
                                       else resolve_source(source.base)))
        text = modelfile(out.name, tokenizer.chat_template, tokenizer.eos_token, base=base_gguf.resolve())
    result, failed = None, None
    with files.replacing(out) as tmp:
        write_adapter_gguf(tensors, float(settings["lora_alpha"]), arch, tmp, quant, source.adapter.resolve().name)
        read_back(tmp, tensors, quant)  # before it takes the name: a file that does not hold them is never left
        # checked before it takes its name too: a check stopped half-way (Ctrl-C) leaves no unchecked OUT.gguf that
        # the same command, run again, would refuse to replace
        if base_gguf is not None and check and importlib.util.find_spec("llama_cpp") is not None:
            result, failed = before_naming(lambda: check_pair(source, base_gguf, tmp, tokenizer, shown=out), out)
    written = write_modelfile(out, text) if text is not None else None
    if failed is not None:
        raise failed
    return out, written, result


@torch.no_grad()
def check_pair(source: AdapterSource, base_gguf: Path, adapter_gguf: Path, tokenizer,
               prompts=PROMPTS, max_new_tokens: int = 48, shown: Path | None = None) -> AdapterCheck:
    """llama.cpp reading base + adapter against transformers reading the same base GGUF with the run's adapter;
    `shown`: the adapter's name in messages (its final path while a temporary file is checked)."""
    from infopo_cli.model.stack import import_bitsandbytes, quiet_peft

    import_bitsandbytes()  # before peft imports it: quiet, as everywhere else
    from peft import PeftModel

    base = load_gguf(base_gguf)
    with quiet_peft():
        tuned = PeftModel.from_pretrained(base, str(source.adapter)).eval()
    stops, result = stop_ids(tokenizer), AdapterCheck()
    with_adapter = LlamaCppReader(base_gguf, context_of(base), adapter=adapter_gguf, shown=shown)
    plain = LlamaCppReader(base_gguf, context_of(base))
    changes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        for prompt in prompts:
            ids = prompt_tensor(tokenizer, prompt)
            prompt_tokens, answer = ids[0].tolist(), greedy(tuned, ids, stops, max_new_tokens)
            reference = answer_logits(tuned, prompt_tokens, answer)
            with tuned.disable_adapter():
                reference_base = answer_logits(tuned, prompt_tokens, answer)
            llama = with_adapter.answer_logits(prompt_tokens, answer)
            result.tokens_same.append(with_adapter.tokenize(tokenizer, prompt) == prompt_tokens)
            result.agreements.append(agreement(reference, llama))
            result.answers.append(tokenizer.decode(answer, skip_special_tokens=True))
            llama_base = plain.answer_logits(prompt_tokens, answer)
            changes.append((llama - llama_base, reference - reference_base, llama_base - reference_base))
    finally:
        with_adapter.close()
        plain.close()
    llama_change, reference_change, noise = (torch.cat([c[i].flatten() for c in changes]) for i in range(3))
    result.signal = float(reference_change.norm() / noise.norm().clamp(min=1e-6))
    if not torch.isfinite(llama_change).all() or not result.signal < float("inf"):
        result.slope = float("nan")  # non-finite logits: judged as a failure below
    elif result.signal >= EFFECT_FLOOR:
        result.slope = float(llama_change @ reference_change / (reference_change @ reference_change))
        if result.signal >= EFFECT_SIGNAL:
            result.effect = float(torch.nn.functional.cosine_similarity(llama_change, reference_change, dim=0))
    return result
