"""`infopo plan --fsdp N`: what one card holds with the frozen base sharded over N processes (FSDP2), by hand, against
the tensors bitsandbytes and torch.chunk really make, and the number of cards `infopo plan` answers with."""

from __future__ import annotations

import re
from dataclasses import replace
from io import StringIO

import pytest
import torch
from rich.console import Console

from conftest import build_architecture, infopo
from infopo_cli.config import merge
from infopo_cli.errors import ConfigError
from infopo_cli.model import memory_plan as mp
from infopo_cli.model.architectures import find_architecture
from infopo_cli.presets import find, load_preset
from infopo_cli.reporting.memory_table import print_plan

# odd sizes on purpose: 3 ranks leave padding in the q/k/v/o codes, the norms and the embedding
SMALL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False}


def training(**kw) -> mp.Training:
    settings = dict(lora_r=16, targets=None, lora_dropout=0.0, compute_bytes=2, quantized=True,
                    optimizer="paged_adamw_8bit", device="cuda", attention="sdpa", lm_chunk=mp.LM_CHUNK)
    return mp.Training(**{**settings, **kw})


def plan_text(preset: str, gpu_mem: float = 24.0, fsdp: int = 1, **settings) -> str:
    out = StringIO()
    cfg = merge(load_preset(preset), settings, "test")
    print_plan(Console(file=out, width=400), cfg, None, gpu_mem, fsdp=fsdp, preset=preset)
    return " ".join(out.getvalue().replace("│", " ").split())  # the table's rows as plain words


# --- the shard one rank holds ---------------------------------------------------------------------------

def test_shard_bytes_by_hand_with_fsdp2_padding():
    arch = mp.architecture(SMALL)
    # per layer, the codes as (numel / 2 bytes) rows of 2 bytes: q 64x64 -> 1024 rows, k and v 64x32 -> 512,
    # o 1024, gate/up/down 64x96 -> 1536 each; two norms of 64; the decoder: final norm 64, embedding 100 x 64 x 2 B
    whole = 2 * (2 * (1024 + 512 + 512 + 1024 + 3 * 1536) + 2 * 2 * 64) + (2 * 64 + 100 * 128)
    assert mp.fsdp_shard_bytes(arch, training(), 1) == whole == 44160
    assert mp.fsdp_shard_bytes(arch, training(), 2) == whole // 2  # every dim 0 is even: no padding
    # ceil(rows / 3): 1024 -> 342, 512 -> 171, 1536 -> 512, 64 -> 22, 100 -> 34
    three = 2 * (2 * (342 + 171 + 171 + 342 + 3 * 512) + 2 * 2 * 22) + (2 * 22 + 34 * 128)
    assert mp.fsdp_shard_bytes(arch, training(), 3) == three == 14820
    assert 3 * three > whole  # the padding every rank holds


def test_tied_embedding_stays_whole_and_qwen2_biases_are_split_per_tensor():
    arch = mp.architecture({**SMALL, "model_type": "qwen2", "tie_word_embeddings": True})
    # biases q 64, k 32, v 32 -> 22, 11, 11 rows of 2 bytes on each of 3 ranks; no embedding (it is the output layer)
    layer = 2 * (342 + 171 + 171 + 342 + 3 * 512) + 2 * (22 + 11 + 11) + 2 * 2 * 22
    assert mp.fsdp_shard_bytes(arch, training(), 3) == 2 * layer + 2 * 22
    parts = {p.name: p for p in mp.static_parts(arch, training(fsdp=3))}
    tied = parts["embedding and output layer, 16-bit"]
    assert tied.bytes == 100 * 64 * 2 and "whole on every card" in tied.note
    assert "input embedding, 16-bit" not in parts and "gathered: the final norm" in parts


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])  # untied; tied with q/k/v biases
def test_shard_bytes_match_the_tensors_bitsandbytes_stores_split_as_fsdp2_splits_them(arch_name, tmp_path):
    """A tiny model loaded 4-bit with its codes stored in bf16 (quant_storage), every parameter FSDP shards (the
    decoder's, minus a tied output layer) cut by torch.chunk as FSDP2 does: each rank's storage is chunk 0's size."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = build_architecture(arch_name, tmp_path / arch_name)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    whole = set(model.get_output_embeddings().parameters())
    sharded = [p for p in model.get_decoder().parameters() if p not in whole]
    arch = find_architecture(folder)[0]
    for n in (1, 2, 3, 5):
        held = sum(torch.chunk(p.data, n, dim=0)[0].nbytes for p in sharded)
        assert mp.fsdp_shard_bytes(arch, training(), n) == held, n


# --- the parts of one card --------------------------------------------------------------------------------

def test_fsdp_1_is_the_one_card_plan():
    arch = find_architecture("meta-llama/Meta-Llama-3-70B-Instruct")[0]
    run = training()
    assert mp.static_parts(arch, replace(run, fsdp=1)) == mp.static_parts(arch, run)
    one = {p.name: p.bytes for p in mp.static_parts(arch, run)}
    # the same weights counted the sharded way, whole (n = 1): shards, statistics and the output layer
    statistics = round(arch.linear_params * (mp.NF4_BYTES - 0.5))
    assert abs(mp.fsdp_shard_bytes(arch, run, 1) + statistics + arch.vocab * arch.hidden * 2
               - one["base weights, 4-bit NF4"] - one["embeddings and output layer, 16-bit"] - one["norms and biases"]) <= 1
    assert plan_text("llama3-8b-qlora", fsdp=1) == plan_text("llama3-8b-qlora")
    assert "split" not in plan_text("llama3-8b-qlora", fsdp=1)


def test_split_parts_shrink_with_the_cards_and_replicated_ones_do_not():
    arch = find_architecture("meta-llama/Meta-Llama-3-70B-Instruct")[0]
    cards = (2, 3, 4, 8, 16)
    parts = {n: mp.static_parts(arch, training(fsdp=n)) for n in cards}
    for n in cards:
        split = [p for p in parts[n] if p.note.endswith(f"split {n} ways")]
        assert {p.name for p in split} == {"base weights, 4-bit codes", "input embedding, 16-bit", "norms and biases"}
        assert sum(p.bytes for p in split) == mp.fsdp_shard_bytes(arch, training(), n)
    replicated = {n: {p.name: p.bytes for p in parts[n] if "whole on every card" in p.note} for n in cards}
    assert set(replicated[2]) == {"base weights, NF4 statistics", "output layer, 16-bit", "LoRA weights, float32",
                                  "LoRA gradients, float32", "optimizer: paged 8-bit AdamW"}
    assert all(replicated[n] == replicated[2] for n in cards)
    codes = [next(p.bytes for p in parts[n] if p.name == "base weights, 4-bit codes") for n in cards]
    assert codes == sorted(codes, reverse=True) and codes[0] > 7 * codes[-1]
    # gathered for compute, whatever N: two whole layers and the final norm (the embedding only for its lookup, when
    # no layer is gathered: at no peak)
    layer = sum(lin.fan_in * lin.fan_out for lin in arch.linears) // 2
    for n in cards:
        gathered = {p.name: p.bytes for p in parts[n] if p.name.startswith("gathered")}
        assert 2 * layer <= gathered["gathered: 2 decoder layers"] < 2 * layer * 1.001
        assert arch.hidden * 2 <= gathered["gathered: the final norm"] < arch.hidden * 2 + 2 * n


# --- how many cards -----------------------------------------------------------------------------------------

ANSWER = re.compile(r"(?:does not fit one 24 GiB GPU|fits one 24 GiB GPU only inside the margin); with --fsdp it fits on "
                    r"(\d+) cards: infopo train --preset (\S+) --fsdp --nproc (\d+) --data \.\.\.")


def test_the_70b_preset_does_not_fit_one_card_and_the_answer_names_the_fewest_cards(tmp_path):
    out = infopo("plan", "--preset", "llama3-70b-qlora", "--gpu-mem", "24",
                 env={"HF_HOME": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1", "COLUMNS": "400"})
    assert out.returncode == 0, out.stderr
    found = ANSWER.search(" ".join(out.stdout.split()))
    assert found, out.stdout
    cards = int(found.group(1))
    assert found.group(2) == "llama3-70b-qlora" and int(found.group(3)) == cards > 1
    assert f"each of {cards} cards: fits in 24 GiB with" in plan_text("llama3-70b-qlora", fsdp=cards)
    fewer = plan_text("llama3-70b-qlora", fsdp=cards - 1)
    assert re.search(rf"(does not fit {cards - 1} GPUs of 24 GiB|fits {cards - 1} GPUs of 24 GiB only inside the margin); "
                     rf"with --fsdp it fits on {cards} cards", fewer), fewer
    # the 4-bit codes alone are more than one 24 GiB card: two cards can never do
    assert cards > 2


def test_each_new_preset_fits_the_cards_its_command_names_and_not_one():
    for name in ("llama3-70b-qlora", "qwen2.5-32b-qlora"):
        command = find(name).read_text().splitlines()[0]
        cards = int(re.fullmatch(rf"# infopo train --preset {re.escape(name)} --fsdp --nproc (\d+) --data \S+",
                                 command).group(1))
        text = plan_text(name, fsdp=cards)
        assert f"each of {cards} cards: fits in 24 GiB with" in text, name
        assert f"train it so: infopo train --preset {name} --fsdp --nproc {cards} --data ..." in text
        assert 1 < int(ANSWER.search(plan_text(name)).group(1)) <= cards, name  # the fewest that fit: no more than it names


def test_the_answer_tells_a_run_over_the_card_from_one_inside_its_margin():
    from infopo_cli.reporting.memory_table import more_cards

    assert more_cards(24, 1, 2, "p") == ("does not fit one 24 GiB GPU; with --fsdp it fits on 2 cards: "
                                         "infopo train --preset p --fsdp --nproc 2 --data ...")
    assert more_cards(24, 3, 4, "p", tight=True).startswith("fits 3 GPUs of 24 GiB only inside the margin; with --fsdp")
    assert more_cards(24, mp.MOST_CARDS, None, "p") == f"does not fit {mp.MOST_CARDS} GPUs of 24 GiB"


def test_a_run_too_large_for_16_cards_says_so():
    text = plan_text("llama3-70b-qlora", gpu_mem=6.0)
    assert f"does not fit one 6 GiB GPU, nor {mp.MOST_CARDS} with --fsdp" in text and "--nproc" not in text


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_bad_fsdp_is_a_one_line_error(value):
    out = infopo("plan", "--preset", "llama3-70b-qlora", "--fsdp", value)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: --fsdp must be the number of GPUs to shard the base over, 1 or more (got {value})")
    with pytest.raises(ConfigError, match="^--fsdp must be"):
        plan_text("smollm2-135m", fsdp=int(value))
