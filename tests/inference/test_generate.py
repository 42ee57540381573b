"""`infopo eval`, `infopo generate`, `infopo chat` on a tiny run: numbers checked by hand, replies against
transformers' own greedy loop, padding that changes nothing, answer matching, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import infopo
from infopo_cli.data.loading import read_pairs
from infopo_cli.data.tokenization import encode_pair
from infopo_cli.errors import ConfigError, DataError
from infopo_cli.inference.generation import stop_ids
from infopo_cli.inference.answers import last_number, matches, stated_answer
from infopo_cli.inference.chat import ChatSession, run_chat
from infopo_cli.workflows.evaluation import EvalRequest, evaluate
from infopo_cli.inference.generation import Sampling, as_messages, generate, stream
from infopo_cli.inference.models import find_target, load_target
from infopo_cli.reporting.intervals import binomial_two_sided, wilson
from infopo_cli.train import recipe

PROMPTS = ["What is 12 + 30?", "hi", "Name a colour that is not red, please.", "What is 7 + 8?", "Say something."]
SHORT = Sampling(max_new_tokens=8)


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    """Two steps at a high learning rate: the tuned model answers differently from its base."""
    from conftest import tiny_cfg, write_pairs

    folder = tmp_path_factory.mktemp("gen-run")
    pairs = write_pairs(folder / "pairs.jsonl", 8)
    cfg = tiny_cfg(tiny_model, pairs, folder / "run", lr=5e-2, max_steps=2)
    summary = recipe.train(cfg)
    assert summary.status == "completed"
    return Path(summary.output)


@pytest.fixture(scope="module")
def loaded(run):
    return load_target(find_target(run, log=lambda _: None), log=lambda _: None)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- preference metrics ----------------------------------------------------------------------------

def sequence_logp(model, prompt: list[int], response: list[int]) -> float:
    logps = model(torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
    return float(sum(logps[len(prompt) - 1 + k, token] for k, token in enumerate(response)))


@pytest.mark.run
@torch.no_grad()
def test_preference_metrics_equal_a_hand_computation(run, loaded, tmp_path):
    """Reward accuracy, margin, loss and log-prob changes of `eval`, against full-logit forwards with the adapter
    on and off and InfoPO's formula (beta 1): L = -delta_w + exp(delta_l), margin = delta_w - delta_l."""
    source = run.parent / "pairs.jsonl"
    fixed = write_jsonl(tmp_path / "fixed.jsonl", [json.loads(line) for line in source.read_text().splitlines()[:3]])
    result = evaluate(EvalRequest(str(run), data=str(fixed), out=str(tmp_path / "e.json")), log=lambda _: None)
    pref = result.preference

    model, tokenizer = loaded.model, loaded.tokenizer
    rows = {"dw": [], "dl": [], "pw": [], "pl": [], "rw": [], "rl": [], "nw": 0, "nl": 0}
    for pair in read_pairs(str(fixed)):
        ids = encode_pair(tokenizer, pair, 128, 64)
        pw, pl = sequence_logp(model, ids.prompt_ids, ids.chosen_ids), sequence_logp(model, ids.prompt_ids, ids.rejected_ids)
        with model.disable_adapter():
            rw, rl = sequence_logp(model, ids.prompt_ids, ids.chosen_ids), sequence_logp(model, ids.prompt_ids, ids.rejected_ids)
        for key, value in (("pw", pw), ("pl", pl), ("rw", rw), ("rl", rl), ("dw", pw - rw), ("dl", pl - rl)):
            rows[key].append(value)
        rows["nw"] += len(ids.chosen_ids)
        rows["nl"] += len(ids.rejected_ids)
    dw, dl = torch.tensor(rows["dw"]), torch.tensor(rows["dl"])
    assert pref["pairs"] == 3 and pref["loss_name"] == "infopo"
    assert pref["loss"] == pytest.approx(float((-dw + dl.exp()).mean()), abs=1e-4)
    assert pref["reward_margin"] == pytest.approx(float((dw - dl).mean()), abs=1e-4)
    assert pref["reward_accuracy"] == pytest.approx(float((dw - dl > 0).float().mean()))
    assert pref["logp_change_chosen"] == pytest.approx(float(dw.mean()), abs=1e-4)
    assert pref["logp_change_rejected"] == pytest.approx(float(dl.mean()), abs=1e-4)
    assert pref["logp_change_chosen_per_token"] == pytest.approx(float(dw.sum()) / rows["nw"], abs=1e-5)
    assert pref["logp_change_rejected_per_token"] == pytest.approx(float(dl.sum()) / rows["nl"], abs=1e-5)
    own = lambda a, b: float((torch.tensor(rows[a]) > torch.tensor(rows[b])).float().mean())  # noqa: E731
    assert pref["preference_accuracy"] == pytest.approx({"base": own("rw", "rl"), "tuned": own("pw", "pl")})
    assert pref["logp_change_chosen"] != pytest.approx(0, abs=1e-3)  # training moved something
    assert json.loads((tmp_path / "e.json").read_text())["preference"]["loss"] == pytest.approx(pref["loss"])


# --- generation ------------------------------------------------------------------------------------

@torch.no_grad()
def direct_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """transformers' own greedy loop, one prompt, no padding."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    stops = stop_ids(tokenizer)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    cut = next((k for k, token in enumerate(out) if token in stops), len(out))
    return tokenizer.decode(out[:cut], skip_special_tokens=True)


@pytest.fixture(scope="module")
def direct(loaded) -> dict[str, list[str]]:
    tuned = [direct_greedy(loaded.model, loaded.tokenizer, p, SHORT.max_new_tokens) for p in PROMPTS[:3]]
    with loaded.model.disable_adapter():
        base = [direct_greedy(loaded.model, loaded.tokenizer, p, SHORT.max_new_tokens) for p in PROMPTS[:3]]
    return {"tuned": tuned, "base": base}


@pytest.fixture(scope="module")
def generated(run, direct, tmp_path_factory):
    """`eval --generate` on prompt-only rows whose answers are: the tuned reply, the base reply, 42."""
    folder = tmp_path_factory.mktemp("gen-eval")
    answers = [direct["tuned"][0], direct["base"][1], 42]
    data = write_jsonl(folder / "questions.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers)])
    request = EvalRequest(str(run), data=str(data), generate=True, sampling=SHORT, batch_size=2, out=str(folder / "r.json"))
    return evaluate(request, log=lambda _: None), answers


@pytest.mark.run
def test_generate_accuracy_equals_a_direct_greedy_loop(generated, direct):
    result, answers = generated
    gen = result.generation
    for side in ("base", "tuned"):
        assert [row[side]["text"] for row in result.rows] == direct[side]
        expected = [matches(reply, answer) for reply, answer in zip(direct[side], answers)]
        assert gen[side]["accuracy"] == pytest.approx(sum(expected) / 3) and gen[side]["correct"] == sum(expected)
        assert [row[side]["correct"] for row in result.rows] == expected
    assert gen["tuned"]["correct"] >= 1 and gen["with_answer"] == 3
    right = {side: [matches(reply, answer) for reply, answer in zip(direct[side], answers)] for side in ("base", "tuned")}
    for side in ("base", "tuned"):
        assert gen[side]["interval"] == pytest.approx(list(wilson(sum(right[side]), 3)))
    tuned_only = sum(t and not b for t, b in zip(right["tuned"], right["base"]))
    base_only = sum(b and not t for t, b in zip(right["tuned"], right["base"]))
    assert (gen["paired"]["tuned_only"], gen["paired"]["base_only"]) == (tuned_only, base_only)
    assert gen["paired"]["p_value"] == pytest.approx(binomial_two_sided(min(tuned_only, base_only), tuned_only + base_only))
    assert not gen["paired"]["real"]  # three problems can never show a real difference
    assert "(McNemar p = " in result.table_path.read_text(encoding="utf-8")
    assert result.preference is None and any("no preference pairs" in note for note in result.notes)
    lines = result.replies_path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["tuned"]["text"] for line in lines] == direct["tuned"]
    assert result.table_path.read_text(encoding="utf-8").count("\n| ") == 4  # header + 3 rows
    assert json.loads(result.out.read_text())["generation"]["tuned"]["correct"] == gen["tuned"]["correct"]


@pytest.mark.run
def test_base_and_tuned_replies_differ_after_training(generated):
    result, _ = generated
    assert result.generation["changed"] > 0
    assert any(row["base"]["text"] != row["tuned"]["text"] for row in result.rows)


@pytest.mark.run
def test_batched_greedy_equals_one_by_one_greedy(loaded):
    """Left padding and batch composition change no greedy answer; the chat stream gives the same text."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [as_messages(p) for p in PROMPTS]
    batched = generate(model, tokenizer, prompts, SHORT, batch_size=len(prompts))
    alone = [generate(model, tokenizer, [p], SHORT, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert len({len(p) for p in PROMPTS}) > 1  # the batch really was padded
    assert ["".join(stream(model, tokenizer, p, SHORT)) for p in prompts[:2]] == [r.text for r in batched[:2]]
    with loaded.base() as base:
        one_by_one = [generate(base, tokenizer, [p], SHORT)[0] for p in prompts]
        assert generate(base, tokenizer, prompts, SHORT, batch_size=3) == one_by_one


def test_replies_stay_inside_the_models_context(run, loaded, monkeypatch):
    """A reply that reaches the model's context ends there, cut (not stopped), each row at its own prompt's length
    whatever it is batched with, instead of running on past the positions the model knows; a budget past the whole
    context is said at once; a prompt that fills the context is one line naming it; a chat goes on after one."""
    from infopo_cli.inference.generation import ContextFull, budget_note, context_of, decode, prompt_ids

    model, tokenizer = loaded.model, loaded.tokenizer
    context = context_of(model)
    assert context == model.config.max_position_embeddings
    assert budget_note(context, context - 1) is None and budget_note(None, 10**9) is None
    assert budget_note(context, context) == (f"--max-new-tokens {context} is past the model's context of {context} tokens "
                                           "(the prompt and the reply together): each reply ends where its prompt and "
                                           "reply fill it")
    out = infopo("eval", str(run), "--generate", "--max-new-tokens", "100000", "--data", str(
        write_jsonl(run.parent / "one.jsonl", [{"prompt": "What is 1 + 1?", "answer": 2}])), "--out",
        str(run.parent / "ev" / "e.json"))
    assert out.returncode == 0, out.stderr
    assert f"--max-new-tokens 100000 is past the model's context of {context} tokens" in out.stdout + out.stderr
    assert any("past the model's context" in n for n in json.loads((run.parent / "ev" / "e.json").read_text())["notes"])

    long, short = as_messages("Name a colour that is not red, please."), as_messages("hi")
    length, brief = len(prompt_ids(tokenizer, long)), len(prompt_ids(tokenizer, short))
    monkeypatch.setattr(model.config, "max_position_embeddings", length + 3)
    reply = generate(model, tokenizer, [long], Sampling(max_new_tokens=length + 2))[0]
    assert reply.new_tokens == 3 and not reply.stopped, reply  # this prompt's reply runs on (checked: it never stops)
    alone = generate(model, tokenizer, [short], Sampling(max_new_tokens=length + 2), batch_size=1)[0]
    both = generate(model, tokenizer, [long, short], Sampling(max_new_tokens=length + 2), batch_size=2)
    assert both[0] == reply and both[1] == alone  # the short prompt is not cut at the long one's room
    assert alone.new_tokens == min(length + 2, length + 3 - brief) > reply.new_tokens and not alone.stopped, alone

    # a process whose rows all ended while another's go on (`any_going` true) keeps step with it, the full budget,
    # its rows riding along unseen with their positions kept inside the model (an index error with learned ones)
    fed = []
    hook = model.get_base_model().model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(int(kwargs["position_ids"].max())), with_kwargs=True)
    ids = torch.tensor([prompt_ids(tokenizer, long)])
    try:
        steps = list(decode(model, ids, torch.ones_like(ids), Sampling(max_new_tokens=length + 2), stop_ids(tokenizer),
                            any_going=lambda going: True))
    finally:
        hook.remove()
    assert len(steps) == length + 2 and [len(rows) for rows, _ in steps] == [1, 1, 1] + [0] * (length - 1)
    assert max(fed) == length + 2  # the model's last position: context - 1

    monkeypatch.setattr(model.config, "max_position_embeddings", length)
    with pytest.raises(ContextFull, match=f"prompt 2 of 2 has {length} tokens: it fills the model's context of {length}"):
        generate(model, tokenizer, [short, long], Sampling(max_new_tokens=1))
    turns = iter(["Name a colour that is not red, please.", "hi"])
    shown, notes = [], []
    replies = run_chat(ChatSession(), lambda messages: stream(model, tokenizer, messages, Sampling(max_new_tokens=2)),
                       lambda: next(turns, None), shown.append, notes.append)
    assert replies == 1 and any(n.startswith("(not answered, and not kept: ") and "/reset" in n and
                                f"fills the model's context of {length} tokens" in n for n in notes), notes


def test_bundled_eval_answers_come_from_the_chosen_replies():
    from infopo_cli.inference.prompts import rows_from_pairs

    rows = rows_from_pairs(read_pairs("bundled:arith_eval"), {})
    assert len(rows) == 150 and all(row.answer_from == "chosen" for row in rows)
    assert rows[0].answer == "26" and rows[0].question.startswith("A number plus 21 equals 47")


@pytest.mark.parametrize("reply, answer, expected", [
    ("The answer is 42.", 42, True),
    ("The answer is 42.", "42", True),
    ("12 + 30 = 42, not 41", 42, False),            # the LAST number counts
    ("In total 1,234,567 apples.", 1234567, True),  # thousands separators
    ("It is -15 degrees", -15, True),
    ("10-3 = 7", 7, True),                          # a minus after a digit is a subtraction
    ("x-3", -3, False),
    ("pi is about 3.14.", 3.14, True),
    ("2.50", "2.5", True),
    ("costs $1,000.50", 1000.5, True),
    ("no number here", 3, False),
    ("  Paris. ", "paris", True),
    ("PARIS!", "Paris", True),
    ("It is Paris", "Paris", False),                # a text answer is the whole reply
    ("true", True, True),
])
def test_answer_matching_rules(reply, answer, expected):
    assert matches(reply, answer) is expected


def test_number_extraction_and_stated_answers():
    assert last_number("1,2,3") == 3 and last_number("−4 (minus sign)") == -4 and last_number("none") is None
    assert stated_answer("so 47 - 21 = 26. The answer is 26.") == "26" and stated_answer("The answer is Paris.") is None


# --- commands --------------------------------------------------------------------------------------

@pytest.mark.run
def test_generate_and_chat_commands(run, loaded):
    """Both commands at once (each process spends most of its time importing torch)."""
    def start(*args: str) -> subprocess.Popen:  # bytes: a random model's reply may hold a "\r" that text mode rewrites
        return subprocess.Popen([sys.executable, "-m", "infopo_cli", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})

    one_shot = start("generate", str(run), "--prompt", "What is 2 + 2?", "--max-new-tokens", "6")
    session = start("chat", str(run), "--max-new-tokens", "6")
    out, err = (part.decode() for part in one_shot.communicate(timeout=120))
    assert one_shot.returncode == 0, err
    want = generate(loaded.model, loaded.tokenizer, [as_messages("What is 2 + 2?")], Sampling(max_new_tokens=6))[0]
    assert out == want.text + "\n"
    out, err = (part.decode() for part in session.communicate(b"hi\nwhat now?\n/exit\n", timeout=120))
    assert session.returncode == 0 and "error" not in err, err
    first = generate(loaded.model, loaded.tokenizer, [as_messages("hi")], Sampling(max_new_tokens=6))[0].text
    assert out.startswith(first + "\n") and len(out) > len(first) + 1  # the first reply, then a second


@pytest.mark.run
def test_chat_keeps_the_history_and_reset_and_ctrl_c_end_a_reply_only(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    seen, written = [], []
    lines = iter(["hi", "what now?", "/reset", "/rest", "boom", "after", "//exit", "/exit", "never read"])

    def reply(messages):
        seen.append(messages)
        if messages[-1]["content"] == "boom":
            def interrupted():
                yield "par"
                raise KeyboardInterrupt
            return interrupted()
        return stream(model, tokenizer, messages, SHORT)

    session, notes = ChatSession(system="Be brief."), []
    count = run_chat(session, reply, lambda: next(lines, None), written.append, notes.append)
    assert notes[:2] == ["(conversation cleared)", "(unknown command /rest: /reset clears the conversation, /exit (or "
                         "Ctrl-D) ends it, //text sends /text; Ctrl-C stops a reply)"]  # never reaches the model
    first = generate(model, tokenizer, [as_messages("hi", "Be brief.")], SHORT)[0].text
    assert count == 5 and seen[4][-1] == {"role": "user", "content": "/exit"}  # //exit: a message, one slash less
    assert seen[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": first}, {"role": "user", "content": "what now?"}]
    assert seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "boom"}]  # /reset
    assert seen[3][-2:] == [{"role": "assistant", "content": "par"}, {"role": "user", "content": "after"}]

    def ctrl_c_at_the_prompt():
        raise KeyboardInterrupt
    assert run_chat(ChatSession(), reply, ctrl_c_at_the_prompt, written.append, lambda _: None) == 0  # ends the session


@pytest.mark.run
def test_compare_and_base_model_flags(run, loaded):
    """In-process (typer's runner): --compare shows both replies, --base-model prints the base's."""
    from typer.testing import CliRunner

    from infopo_cli.cli import app

    messages = [as_messages("hi")]
    with loaded.base() as base:
        before = generate(base, loaded.tokenizer, messages, SHORT)[0].text
    runner = CliRunner()
    out = runner.invoke(app, ["generate", str(run), "--prompt", "hi", "--max-new-tokens", "8", "--base-model"])
    assert out.exit_code == 0 and out.stdout.startswith(before + "\n"), out.output
    out = runner.invoke(app, ["generate", str(run), "--prompt", "hi", "--max-new-tokens", "8", "--compare"],
                        env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "base (adapter disabled)" in out.stdout and "tuned" in out.stdout, out.output
    out = infopo("generate", str(run), "--prompt", "hi", "--base-model", "--compare")
    assert out.returncode == 2 and out.stderr.startswith("error: --base-model and --compare: --compare prints the base's")


@pytest.mark.run
def test_adapter_folder_with_base_loads_the_runs_adapter(run, loaded, tiny_model, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / name, adapter / name)
    target = find_target(adapter, base=str(tiny_model))
    assert target.kind == "adapter" and target.base == str(tiny_model)
    assert find_target(run, base=str(tiny_model)).kind == "adapter"  # the run's own base, spelt as given: accepted
    with pytest.raises(ConfigError, match=r"^--base .*other: .* was trained on .*, and its adapter means nothing on "
                                          r"another base; drop --base"):
        find_target(run, base=str(tmp_path / "other"))  # a run's adapter put on another model was scored silently
    again = load_target(target, log=lambda _: None)  # dtype auto (no run settings): compare weights, not greedy text
    assert again.has_adapter and again.can_compare
    from peft import get_peft_model_state_dict

    mine, runs = get_peft_model_state_dict(again.model), get_peft_model_state_dict(loaded.model)
    assert mine.keys() == runs.keys() and all(torch.equal(mine[k].float(), runs[k].float().to(mine[k].dtype).float())
                                              for k in mine)


@pytest.mark.run
def test_merged_folder_has_no_base_unless_given(run, tiny_model, tmp_path):
    from infopo_cli.export.merged import AdapterSource, export_merged

    merged = export_merged(AdapterSource(str(tiny_model), run), tmp_path / "merged", log=lambda _: None)
    data = str(run.parent / "pairs.jsonl")
    result = evaluate(EvalRequest(str(merged), data=data, out=str(tmp_path / "m.json")), log=lambda _: None)
    assert result.preference is None and any(f"pass --base BASE (a second model is loaded: it was merged from "
                                             f"{tiny_model.resolve()})" in note for note in result.notes), result.notes
    result = evaluate(EvalRequest(str(merged), data=data, base=str(tiny_model), out=str(tmp_path / "b.json")),
                      log=lambda _: None)
    assert result.preference["pairs"] == 8 and result.preference["reference"] == "base (--base)"
    with pytest.raises(ConfigError, match="no base inside it"):
        load_target(find_target(merged, log=lambda _: None), log=lambda _: None).base().__enter__()


def test_gguf_file_answers_through_llama_cpp(tmp_path):
    """A GGUF (SentencePiece tokenizer: llama.cpp needs BPE merges or a unigram vocabulary) answers and streams."""
    pytest.importorskip("llama_cpp")
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_spm_tokenizer
    from infopo_cli.export.gguf import write_gguf
    from infopo_cli.inference.gguf_model import GgufModel

    tokenizer = build_spm_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    write_gguf(LlamaForCausalLM(config), tokenizer, tmp_path / "m.gguf", "f16", model_name="tiny")
    model = GgufModel(tmp_path / "m.gguf")
    try:
        reply = model.reply(as_messages("what is 2"), Sampling(max_new_tokens=4))
        assert isinstance(reply.text, str) and 1 <= reply.new_tokens <= 4
        streamed = "".join(model.stream(as_messages("what is 2"), Sampling(max_new_tokens=4)))
        assert reply.text.startswith(streamed)  # greedy; a character cut at the last token is not streamed
        assert model.context == 256  # the file's trained context, below the 4096 asked for
        # a chat that outgrew the context: a note and the session goes on, as with a transformers model
        turns = iter(["what is 2 " * 200, "what is 2"])
        notes = []
        replies = run_chat(ChatSession(), lambda messages: model.stream(messages, Sampling(max_new_tokens=4)),
                           lambda: next(turns, None), lambda piece: None, notes.append)
        assert replies == 1 and any("fills the model's context of 256 tokens" in n for n in notes), notes
    finally:
        model.close()


@pytest.mark.run
def test_a_missing_answer_is_no_answer_whichever_way_the_file_writes_it(tmp_path):
    """An empty CSV cell, a blank string or pandas' NaN would otherwise be a reference no reply matches: scored wrong
    for both models instead of left out, as a null is."""
    from infopo_cli.inference.prompts import answers_by_row, read_prompt_rows

    (tmp_path / "q.csv").write_text("prompt,answer\nWhat is 2 + 2?,4\nWhat is 3 + 3?,\n")
    assert [row.answer for row in read_prompt_rows(str(tmp_path / "q.csv"))] == ["4", None]
    (tmp_path / "q.jsonl").write_text('{"prompt": "a", "answer": NaN}\n{"prompt": "b", "answer": "  "}\n'
                                      '{"prompt": "c", "answer": null}\n{"prompt": "d", "answer": 0}\n')
    rows = read_prompt_rows(str(tmp_path / "q.jsonl"))
    assert [(row.answer, row.answer_from) for row in rows] == [(None, ""), (None, ""), (None, ""), (0, "answer")]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y", "answer": ""},
                                               {"prompt": "b", "chosen": "x", "rejected": "y", "answer": 7}])
    assert answers_by_row(str(pairs)) == {f"{pairs}:2": 7}
    (tmp_path / "inf.jsonl").write_text('{"prompt": "a", "answer": Infinity}\n')
    with pytest.raises(DataError, match=r"inf.jsonl:1: field 'answer': not a finite number"):
        read_prompt_rows(str(tmp_path / "inf.jsonl"))


def test_prompt_rows_take_their_own_system_message_first(tmp_path):
    from infopo_cli.inference.prompts import read_prompt_rows

    (tmp_path / "q.jsonl").write_text('{"prompt": "a", "system": "Be brief."}\n{"prompt": "b", "system": ""}\n')
    rows = read_prompt_rows(str(tmp_path / "q.jsonl"), system="Be kind.")
    assert [row.messages[0]["content"] for row in rows] == ["Be brief.", "Be kind."]


def test_bad_inputs_are_one_line(run, tmp_path, monkeypatch):
    out = infopo("eval", str(tmp_path / "no-such-run"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "no such folder" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": 42, "answer": 1}])
    with pytest.raises(DataError) as err:
        evaluate(EvalRequest(str(run), data=str(bad), generate=True), log=lambda _: None)
    assert str(err.value) == f"{bad}:2: field 'prompt': expected a string, got a number"
    wrong_answer = write_jsonl(tmp_path / "answer.jsonl", [{"prompt": "fine", "answer": [1]}])
    with pytest.raises(DataError, match=r"answer.jsonl:1: field 'answer': expected a number or a string, got an array"):
        evaluate(EvalRequest(str(run), data=str(wrong_answer), generate=True), log=lambda _: None)
    with pytest.raises(ConfigError, match="only --generate can use it"):
        evaluate(EvalRequest(str(run), data=str(bad)), log=lambda _: None)
    with pytest.raises(ConfigError, match=r"name a \.json file"):
        evaluate(EvalRequest(str(run), out=str(tmp_path / "out.txt")), log=lambda _: None)
    for temperature in (-1, float("inf")):
        with pytest.raises(ConfigError, match="--temperature must be 0"):
            Sampling(temperature=temperature).check()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"adapter: adapter_config.json but no adapter weights \(adapter_model"):
        find_target(tmp_path / "adapter", base="some/base")  # peft would have asked the hub for them
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="pass --base BASE"):
        find_target(tmp_path / "adapter")

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    from infopo_cli.inference.gguf_model import GgufModel

    with pytest.raises(ConfigError) as err:
        GgufModel(gguf)
    assert str(err.value) == f"{gguf}: reading a GGUF file needs llama.cpp: pip install 'infopo[gguf-check]'"
