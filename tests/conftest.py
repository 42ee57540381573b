"""Shared fixtures: a private INFOPO_HOME per test, the embedded default converted once per session, and a tiny
random Llama with a byte-level ChatML tokenizer, built locally (no hub)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tokenizer(chat_template: str | None = CHATML):
    """Byte-level tokenizer: every byte is a token, plus ChatML specials. Fast and fully local."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = chat_template
    return fast


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)


def build_architecture(arch: str, folder, tokenizer=None) -> str:
    """A tiny random model of `arch` (the presets' architectures) with `tokenizer` (default: the byte-level one), saved
    in `folder`; SMALL sets its sizes."""
    import transformers as T

    tokenizer = tokenizer or build_tokenizer()
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, **SMALL)
    config = {
        "llama": lambda: T.LlamaConfig(**common, tie_word_embeddings=False),
        "mistral": lambda: T.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**common, tie_word_embeddings=True),
        "gemma2": lambda: T.Gemma2Config(**common, head_dim=256, query_pre_attn_scalar=256, final_logit_softcapping=30.0,
                                         attn_logit_softcapping=50.0, sliding_window=64),  # Gemma-2's own caps
        "phi3": lambda: T.Phi3Config(**common),
        # six layers: five sliding-window ones (rope base 1e4) and a global one (1e6), as Gemma 3 alternates them;
        # head_dim 256 as in Gemma 3 up to 12B (transformers reads a gemma3 GGUF's query scale as 1/sqrt(256))
        "gemma3": lambda: T.Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=256, query_pre_attn_scalar=256,
                                             sliding_window=64, rope_parameters={
                                                 "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    }[arch]()
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def build_tiny_model(folder: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            fh.write(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.",
                                 "rejected": f"{a} + {b} = {a + b + rng.choice([-10, -1, 1, 10])}."}) + "\n")
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl", 24)


def make_home(tmp_path_factory: pytest.TempPathFactory, shared_home: Path) -> Path:
    """A fresh INFOPO_HOME (token cache, ...) whose models/ is the session's, so models convert once.

    Not inside tmp_path: some tests assert exactly what their tmp_path holds."""
    folder = tmp_path_factory.mktemp("infopo-home")
    (folder / "models").symlink_to(shared_home / "models", target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory) -> Path:
    """The session's INFOPO_HOME. Its models/ fills lazily: the first test that uses the embedded default converts
    it there (~20 s, 540 MB) and every later one reuses it."""
    home = tmp_path_factory.mktemp("infopo-shared-home")
    (home / "models").mkdir()
    return home


@pytest.fixture(scope="session", autouse=True)
def _session_home(shared_home) -> Iterator[None]:
    """Session- and module-scoped fixtures run before a test's own home is set: they get this one, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFOPO_HOME", str(shared_home))
        yield


@pytest.fixture(autouse=True)
def home(tmp_path_factory, shared_home) -> Iterator[Path]:
    """This test's INFOPO_HOME; subprocesses inherit it. A test may still set INFOPO_HOME to a fresh folder itself.
    Its own MonkeyPatch, so a test's `monkeypatch.undo()` (dropping an injected failure) keeps this home."""
    folder = make_home(tmp_path_factory, shared_home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFOPO_HOME", str(folder))
        yield folder


@pytest.fixture(scope="session")
def default_model(shared_home) -> Path:
    """The embedded default (SmolLM2-135M-Instruct) as a transformers folder, converted at most once per session."""
    from infopo_cli.model import embedded

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFOPO_HOME", str(shared_home))
        return embedded.ensure_converted(log=lambda _: None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


def build_spm_tokenizer():
    """SentencePiece-style BPE as Llama 2 / Mistral ship it in tokenizer.json: '▁' for spaces, a dummy prefix,
    byte fallback to <0xXX> tokens, pieces listed in merge order."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for char in "▁abcdefghijklmnopqrstuvwxyz0123456789+=?.,!":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "s"), ("▁", "is"), ("a", "t"), ("h", "at"),
              ("▁", "w"), ("▁w", "hat"), ("i", "n"), ("▁", "in"), ("e", "r"), ("o", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def at_forward(monkeypatch, call: int, action) -> None:
    """Run `action()` at the recipe's `call`-th training forward pass (1-based; with grad_accum 2, passes 2k-1 and
    2k make step k), e.g. to deliver Ctrl-C in the middle of a step."""
    from infopo_cli.train import recipe

    real, calls = recipe.pair_logps, [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "pair_logps", patched)


def ctrl_c() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGINT)


# A run carried on in a new process is held to these bounds, not bit for bit: now and then torch's CPU kernels compute
# one forward pass of a new process slightly differently (seen with torch 2.13 and MKL 2024.2 in about one resumed
# process in four under pytest, never within one process: one worker thread's rotary-embedding cosines off by up to
# 1.5e-4 in its first step; cause not found), which moves the tiny test model's adapter weights by up to ~3e-6. Within
# one process a resume is compared bit for bit. A resume that loses its RNG state, optimizer state or place in the
# data misses these bounds by far (test_reliability.py shows each).
WEIGHTS_ACROSS_PROCESSES = 2e-5   # largest |difference| of an adapter weight
METRICS_ACROSS_PROCESSES = 1e-4   # |a - b| <= this * (1 + |b|) for a measured float; everything else equal
EXACT_METRICS = ("lr", "epoch")   # floats the schedule computes, not the model: equal in any process


def weight_differences(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], atol: float = 0.0) -> str:
    """'' when both state dicts hold the same tensors (bit for bit, or within `atol`; a NaN is never within), else
    which keys differ and by how much (a rare mismatch in CI is then a diagnosis, not a bare `assert False`)."""
    if want.keys() != got.keys():
        return f"keys differ: missing {sorted(want.keys() - got.keys())[:3]}, extra {sorted(got.keys() - want.keys())[:3]}"
    shapes = [k for k in want if want[k].shape != got[k].shape]
    if shapes:
        return f"{len(shapes)} tensors change shape, e.g. {shapes[0]}"
    gaps = {k: float((want[k].float() - got[k].float()).abs().max()) for k in want if not torch.equal(want[k], got[k])}
    differ = [k for k, gap in gaps.items() if not gap <= atol]  # NaN compares false: never within
    if not differ:
        return ""
    worst = max(differ, key=lambda k: (math.isnan(gaps[k]), gaps[k]))
    return (f"{len(differ)} of {len(want)} tensors differ{f' by more than {atol:g}' if atol else ''}; largest |diff| "
            f"{gaps[worst]:.3g} in {worst}")


def first_difference(want: list[dict], got: list[dict], tolerance: float = 0.0) -> str:
    """The first metrics row where two runs part, for a failure message ('' when the rows are equal: measured float
    values within `tolerance` * (1 + |value|), everything else exactly)."""
    def same(key: str, a, b) -> bool:
        if isinstance(a, float) and isinstance(b, float) and key not in EXACT_METRICS:
            return a == b or abs(a - b) <= tolerance * (1 + abs(b))
        return a == b

    for a, b in zip(want, got):
        if a.keys() != b.keys() or not all(same(k, a[k], b[k]) for k in a):
            return f"first differing row{f' (beyond {tolerance:g})' if tolerance else ''}: {a} vs {b}"
    return "" if len(want) == len(got) else f"{len(want)} rows vs {len(got)}"


ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/runs/ (whole runs stopped, resumed, split over processes, compared; the real default end
    to end) carries the `run` marker, as each test elsewhere that trains a run does by hand."""
    for item in items:
        if item.path.is_relative_to(ROOT / "tests" / "runs"):
            item.add_marker(pytest.mark.run)

def infopo(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, stdin: str = "",
           timeout: float = 600, without: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`infopo ARGS` in a subprocess, as a user runs it: this test's INFOPO_HOME (inherited), a 200-column terminal
    unless `env` says otherwise, stdin `stdin` (empty: a prompt for input ends at once rather than waits). `without`:
    modules the CLI must find missing even where they are installed (a None in sys.modules is a package not there)."""
    start = (["-c", f"import sys; sys.modules.update(dict.fromkeys({list(without)!r})); "
                    "from infopo_cli.cli import main; main()"] if without else ["-m", "infopo_cli"])
    return subprocess.run([sys.executable, *start, *args], capture_output=True, text=True, input=stdin, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=timeout)


def tiny_cfg(tiny_model, pairs_file, output, **kw):
    """A TrainConfig that trains in seconds on a CPU: fp32, r=4, 3 steps of 4 pairs, 4-bit off (a test about 4-bit
    says load_in_4bit=True; bitsandbytes on a CPU de-quantises every weight at every call). `kw` overrides any field."""
    from infopo_cli.config import TrainConfig

    values = dict(model=str(tiny_model), data=str(pairs_file), eval_data=str(pairs_file), output=str(output),
                  dtype="fp32", load_in_4bit=False, lora_r=4, lora_alpha=8, max_steps=3, batch_size=4, lr=1e-2, eval_batch_size=8,
                  max_length=128, max_prompt_length=64)
    return TrainConfig(**{**values, **kw})


@contextmanager
def benchmark_module(file: str) -> Iterator[ModuleType]:
    """benchmarks/FILE imported as a module (benchmarks/ is not a package), registered in sys.modules while in use:
    dataclasses look their module up by name."""
    path = ROOT / "benchmarks" / file
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
