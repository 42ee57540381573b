"""Nothing from a model folder runs, nothing hangs on the hub, and what export writes or a GGUF reader reads fails in
one line: a folder's own Python code is refused before transformers is asked, bitsandbytes does not ask the hub
for a kernel, a path is never tried as a hub id, a hub id without a hub fails in seconds, an export never replaces
what it must not, a corrupt GGUF is named, a Modelfile reads back as written, and a chat template runs on a clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, write_pairs
from conftest import infopo as run_infopo

from infopo_cli import hub
from infopo_cli.config import TrainConfig
from infopo_cli.errors import ExportError, ModelError, OutputError
from infopo_cli.model import stack
from infopo_cli.model.precision import Precision

NEVER = "infopo never runs code from a model folder"
FP32 = Precision("cpu", torch.float32, "test")
PLAIN = TrainConfig(dtype="fp32", load_in_4bit=False)


def infopo(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """The CLI 300 columns wide: the refusals here name long temporary paths and must stay one line."""
    return run_infopo(*args, env={"COLUMNS": "300", **(env or {})}, **kw)


def error_line(out: subprocess.CompletedProcess) -> str:
    """The run's only error line; exit 2 (the user's input), no traceback."""
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


# --- 1. no code from a model folder ------------------------------------------------------------------------------

def evil_folder(folder: Path, marker: Path, auto_map: bool = True, model_type: str = "evil") -> Path:
    """A tiny model whose config names its own classes in modeling_evil.py, which writes `marker` when imported."""
    build_tiny_model(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    if auto_map:
        config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    return evil_folder(tmp_path / "evil-model", marker), marker


def _merged(folder: Path) -> None:
    from infopo_cli.export.merged import AdapterSource, merged_model

    merged_model(AdapterSource(str(folder), folder))


def _size_table(folder: Path) -> None:
    from infopo_cli.export.gguf import size_table

    size_table(str(folder))


def _ask(folder: Path) -> None:
    from infopo_cli.inference.models import find_target, load_target

    load_target(find_target(str(folder)), log=lambda _: None)


LOADERS = {"resolve_source": lambda f: stack.resolve_source(str(f)),
           "load_tokenizer": lambda f: stack.load_tokenizer(str(f)),
           "load_base": lambda f: stack.load_base(str(f), PLAIN, FP32),
           "export --merged base": _merged, "export --quant list": _size_table, "generate / chat / eval": _ask}


@pytest.mark.parametrize("loader", LOADERS)
def test_a_folder_asking_to_run_its_own_code_is_refused_by_every_loader(loader, evil):
    folder, marker = evil
    with pytest.raises(ModelError) as caught:
        LOADERS[loader](folder)
    assert str(caught.value) == f"{folder}: its config asks to run the folder's own Python code (auto_map); {NEVER}"
    assert not marker.exists()


def test_the_cli_refuses_it_in_one_line_before_any_prompt(evil, tmp_path):
    folder, marker = evil
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    for args in (["generate", str(folder), "--prompt", "hi"],
                 ["train", "--model", str(folder), "--data", str(pairs), "--eval-data", "", "--output", str(tmp_path / "r")]):
        out = infopo(*args)
        assert error_line(out) == f"error: {folder}: its config asks to run the folder's own Python code (auto_map); {NEVER}"
        assert "custom code" not in out.stdout + out.stderr and "[y/N]" not in out.stdout + out.stderr
    assert not marker.exists()


def test_an_unknown_model_type_with_python_beside_it_and_a_tokenizer_auto_map_are_refused(tmp_path):
    folder = evil_folder(tmp_path / "m", tmp_path / "MARKER", auto_map=False)
    with pytest.raises(ModelError, match=r"its config names a model type transformers does not have \('evil'\) and the "
                                         r"folder holds Python code \(modeling_evil\.py\); infopo never runs code"):
        stack.load_base(str(folder), PLAIN, FP32)
    tokenizer_folder = build_tiny_model(tmp_path / "t")
    settings = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    settings.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (tokenizer_folder / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(ModelError, match=r"its tokenizer_config\.json asks to run the folder's own Python code"):
        stack.load_tokenizer(str(tokenizer_folder))
    assert not (tmp_path / "MARKER").exists()


def test_an_auto_map_beside_a_type_transformers_has_loads_transformers_own_class(tmp_path):
    """Phi-3.5's config names its own code and model_type phi3: transformers' class is used, the folder's never."""
    folder = evil_folder(tmp_path / "m", tmp_path / "MARKER", model_type="llama")
    model = stack.load_base(str(folder), PLAIN, FP32)
    assert type(model).__module__.startswith("transformers.") and stack.load_tokenizer(str(folder)) is not None
    assert not (tmp_path / "MARKER").exists()


# --- 2. bitsandbytes asks no hub for a kernel --------------------------------------------------------------------

def test_a_4bit_load_says_nothing_of_trust_remote_code_and_leaves_kernels_importable(tiny_model):
    """bitsandbytes 0.50 fetches a CPU kernel from the hub at import on AVX512-bf16 CPUs and, offline, tells the user
    to set trust_remote_code=True, on every run."""
    code = (f"import torch\nfrom infopo_cli.model import stack\nfrom infopo_cli.config import TrainConfig\n"
            f"from infopo_cli.model.precision import Precision\n"
            f"model = stack.load_base({str(tiny_model)!r}, TrainConfig(dtype='bf16'), Precision('cpu', torch.bfloat16, 't'))\n"
            f"stack.attach_lora(model, TrainConfig(dtype='bf16'))\n"
            f"print(sum(type(m).__name__ == 'Linear4bit' for m in model.modules()))\n"
            f"import kernels\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and int(out.stdout.split()[-1]) > 0, out.stderr[-3000:]
    assert "trust_remote_code" not in out.stdout + out.stderr and "kernels-community" not in out.stderr


# --- 3. local first, the hub on purpose --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["./nope", "../nope", "~/no-such-infopo-model", "nope.gguf", "nope.safetensors",
                                  "data/prefs", "a/b/c"])
def test_a_path_that_does_not_exist_is_refused_at_once(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # so data/prefs is a path here, not a hub id
    start = time.monotonic()
    with pytest.raises(ModelError, match=f"^no such model folder or file: {name}$"):
        stack.resolve_source(name)
    assert time.monotonic() - start < 1


def test_paths_and_hub_ids_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not any(map(hub.looks_like_path, ["gpt2", "Qwen/Qwen2.5-7B-Instruct", "microsoft/phi-1.5", "org/name"]))
    assert all(map(hub.looks_like_path, ["/abs", "~/m", "./m", "m.gguf", "x/y/z", "with space/m", "C:\\models\\m"]))
    (tmp_path / "org").mkdir()
    assert hub.looks_like_path("org/name")


def test_a_train_run_on_a_missing_path_fails_at_once_in_one_line_and_debug_shows_the_traceback(tmp_path):
    """Not after the hub's retries: data/ exists here, so data/prefs is a path, not a hub id."""
    (tmp_path / "data").mkdir()
    pairs = write_pairs(tmp_path / "data" / "pairs.jsonl", 4)
    args = ["train", "--model", "data/prefs", "--data", str(pairs), "--eval-data", "", "--output", "r"]
    start = time.monotonic()
    out = infopo(*args, cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert error_line(out) == "error: no such model folder or file: data/prefs" and time.monotonic() - start < 15
    assert "Traceback" in infopo(*args, "--debug", cwd=tmp_path, timeout=60).stderr


@pytest.mark.parametrize("env, says", [({"HF_ENDPOINT": "http://127.0.0.1:9"}, "tried the hub at http://127.0.0.1:9: cannot "
                                        "connect to 127.0.0.1:9"),
                                       ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set, so the hub is not asked")])
def test_a_hub_id_without_a_hub_fails_in_one_line_within_seconds(env, says, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    start = time.monotonic()
    out = infopo("train", "--model", "infopo-tests/no-such-model", "--data", str(pairs), "--eval-data", "", "--output",
                 str(tmp_path / "r"), env={**env, "HF_HUB_CACHE": str(tmp_path / "hub")}, timeout=60)
    line = error_line(out)
    assert line.startswith("error: cannot load model 'infopo-tests/no-such-model': not a local folder, not in the hub "
                           "cache, and ") and says in line
    assert time.monotonic() - start < 15


def test_the_hub_check_gives_up_after_its_timeout(monkeypatch):
    def silent(*args, **kwargs):
        time.sleep(3)
        raise TimeoutError("timed out")

    monkeypatch.setattr(hub.socket, "create_connection", silent)
    start = time.monotonic()
    assert hub._probe("hub.invalid", 443, "hub.invalid:443", 0.2) == "no answer from hub.invalid:443 within 0.2 s"
    assert time.monotonic() - start < 2


def test_a_cached_hub_model_loads_without_the_hub(tiny_model, tmp_path):
    """Offline (or with the hub down) a hub id is its snapshot in the hub cache, as transformers would read it."""
    repo = tmp_path / "hub" / "models--infopo-tests--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir()
    os.symlink(tiny_model, snapshot)
    code = ("from infopo_cli.model import stack\nsource = stack.resolve_source('infopo-tests/tiny')\n"
            "print(source, stack.load_tokenizer(source).eos_token)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert out.returncode == 0 and out.stdout.split() == [str(snapshot), "<|im_end|>"], out.stderr[-2000:]


# --- 4. export's writers and the GGUF readers --------------------------------------------------------------------

@pytest.fixture
def adapter(tiny_model, tmp_path):
    from infopo_cli.export.merged import AdapterSource

    cfg = TrainConfig(dtype="fp32", load_in_4bit=False, lora_r=4, lora_alpha=8)
    stack.attach_lora(stack.load_base(str(tiny_model), cfg, FP32), cfg).save_pretrained(tmp_path / "adapter")
    return AdapterSource(str(tiny_model), tmp_path / "adapter")


def test_gguf_to_a_folder_or_where_nothing_can_be_written_is_one_line(adapter, tmp_path):
    (tmp_path / "a-file").write_text("the user's")
    base = ["export", "--base", adapter.base, "--adapter", str(adapter.adapter)]
    assert error_line(infopo(*base, "--gguf", "/")) == "error: --gguf /: a folder; name the file to write, e.g. /model.gguf"
    assert error_line(infopo(*base, "--gguf", str(tmp_path / "a-file" / "m.gguf"))) == (
        f"error: --gguf {tmp_path / 'a-file' / 'm.gguf'}: cannot write there, {tmp_path / 'a-file'} is a file, not a folder")
    assert error_line(infopo(*base, "--merged", str(tmp_path / "a-file"))) == (
        f"error: --merged {tmp_path / 'a-file'}: a file is there; --merged writes a folder (nothing was written)")
    assert (tmp_path / "a-file").read_text() == "the user's"


def test_export_outputs_are_claimed_before_the_model_loads(adapter, tmp_path, monkeypatch):
    from infopo_cli.export import export_gguf, merged

    class Loaded(Exception):
        pass

    def merged_model(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(merged, "merged_model", merged_model)
    monkeypatch.setattr(export_gguf, "merged_model", merged_model)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("the user's")
    with pytest.raises(OutputError, match=f"^{tmp_path / 'full'} already exists and is not empty; choose another folder "
                                          r"or pass --overwrite \(nothing was written\)$"):
        merged.export_merged(adapter, tmp_path / "full")
    with pytest.raises(OutputError, match="holds the adapter being exported"):
        merged.export_merged(adapter, tmp_path, overwrite=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Loaded):  # an empty folder is no one's work: it is used
        merged.export_merged(adapter, tmp_path / "empty")
    (tmp_path / "m.Modelfile").write_text("the user's")
    with pytest.raises(OutputError, match=f"^{tmp_path / 'm.Modelfile'} already exists"):
        export_gguf.export_gguf(adapter, tmp_path / "m.gguf", check=False)
    assert (tmp_path / "m.Modelfile").read_text() == "the user's" and not (tmp_path / "m.gguf").exists()
    # nor does --overwrite replace the base model the export reads: a folder, or a GGUF file
    import shutil

    base = merged.AdapterSource(str(shutil.copytree(adapter.base, tmp_path / "base")), adapter.adapter)
    with pytest.raises(OutputError, match="holds the base model the adapter is merged into"):
        merged.export_merged(base, Path(base.base), overwrite=True)
    (tmp_path / "base.gguf").write_bytes(b"GGUF the user's")
    on_gguf = merged.AdapterSource(str(tmp_path / "base.gguf"), adapter.adapter)
    with pytest.raises(OutputError, match=r"--gguf .*base\.gguf is the base model this export reads"):
        export_gguf.export_gguf(on_gguf, tmp_path / "base.gguf", overwrite=True, check=False)
    from infopo_cli.export.export_adapter import export_adapter

    with pytest.raises(OutputError, match=r"--gguf-adapter .*base\.gguf is the base model this export reads"):
        export_adapter(adapter, tmp_path / "base.gguf", base_gguf=tmp_path / "base.gguf", overwrite=True)
    assert (tmp_path / "base.gguf").read_bytes() == b"GGUF the user's" and (tmp_path / "base" / "config.json").is_file()


def truncated_gguf(tiny_model, path: Path) -> Path:
    from infopo_cli.export.gguf import write_gguf

    whole = path.with_name("whole.gguf")
    model = stack.load_base(str(tiny_model), PLAIN, FP32)
    write_gguf(model, stack.load_tokenizer(str(tiny_model)), whole, "f32", "tiny")
    path.write_bytes(whole.read_bytes()[:100])  # a download cut short
    return path


def test_a_corrupt_gguf_is_one_line_naming_it(tiny_model, tmp_path):
    bad = truncated_gguf(tiny_model, tmp_path / "cut.gguf")
    says = f"error: {bad}: not a readable GGUF file, truncated or corrupt ("
    assert error_line(infopo("train", "--model", str(bad), "--data", str(write_pairs(tmp_path / "p.jsonl", 4)),
                             "--eval-data", "", "--output", str(tmp_path / "r"))).startswith(says)
    pytest.importorskip("llama_cpp")
    assert error_line(infopo("generate", str(bad), "--prompt", "hi")).startswith(says)


def ollama_values(text: str) -> list[tuple[str, str]]:
    """(command, value) as Ollama's Modelfile parser reads them: a port of ParseFile's state machine
    (github.com/ollama/ollama, parser/parser.go), which has no escapes."""

    def unquote(s: str) -> tuple[str, bool]:
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    commands, state, buf, name = [], "nil", "", ""
    for ch in text:
        space, newline = ch in " \t", ch in "\r\n"
        if state == "nil":
            nxt, keep = ("comment", "") if ch == "#" else ("nil", "") if space or newline else ("name", ch)
        elif state in ("name", "parameter"):
            nxt, keep = ("value", "") if space else (state, ch)
        elif state == "value":
            nxt, keep = ("nil", ch) if space or newline else ("value", ch)
        else:
            nxt, keep = ("nil", "") if newline else ("comment", "")
        if nxt != state:
            if state == "name":
                nxt, name = ("parameter", name) if buf.lower() == "parameter" else (nxt, {"from": "model"}.get(buf.lower(), buf.lower()))
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = unquote(buf.strip())
                if not ok or space:
                    buf += keep
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if keep.isprintable():
            buf += keep
    if state == "value":
        value, ok = unquote(buf.strip())
        assert ok, f"Ollama: unexpected end of file in {buf!r}"
        commands.append((name, value))
    return commands


@pytest.mark.parametrize("eos", ['<"end\n>', 'end"\n>', '"', '""x', "back\\slash\\n", "<|im_end|>", "a b"])
def test_the_modelfile_reads_back_in_ollama_as_written(eos):
    from infopo_cli.export.modelfile import CHATML, modelfile

    values = ollama_values(modelfile("m.gguf", "{{ '<|im_start|>' }}", eos))
    assert ("model", "./m.gguf") in values and ("template", CHATML) in values
    assert [value for name, value in values if name == "stop"] == ["<|im_end|>", "<|im_start|>"] + (
        [eos] if eos != "<|im_end|>" else [])


def test_a_stop_string_a_modelfile_cannot_hold_is_refused_before_anything_is_written():
    from infopo_cli.export.modelfile import modelfile

    with pytest.raises(ExportError, match=r'^m\.Modelfile: the stop string \'x""" y\' contains """, which an Ollama '
                                          "Modelfile cannot hold$"):
        modelfile("m.gguf", None, 'x""" y')


# --- 5. a chat template on a clock -------------------------------------------------------------------------------

SPIN = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def test_a_chat_template_that_never_ends_stops_with_the_templates_name(tmp_path):
    """In the main thread (a timer) and in another (a trace on the template's code); in a child process, so a
    tokenizer that spins forever (as it did) fails the test instead of hanging it."""
    folder = build_tiny_model(tmp_path / "spinning-model", chat_template=SPIN)
    code = (f"import threading, time\nfrom infopo_cli.data import tokenization\nfrom infopo_cli.data.formats import PreferencePair\n"
            f"from infopo_cli.model.stack import load_tokenizer\n"
            f"tokenization.RENDER_LIMIT_S = 1.0\ntokenizer = load_tokenizer({str(folder)!r})\n"
            f"def encode():\n    start = time.monotonic()\n    try:\n"
            f"        tokenization.encode_pair(tokenizer, PreferencePair('Q?', 'A', 'B', where='p.jsonl:3'), 512, 256)\n"
            f"    except Exception as err:\n        print(type(err).__name__, round(time.monotonic() - start), err, flush=True)\n"
            f"encode()\nthread = threading.Thread(target=encode)\nthread.start()\nthread.join()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    said = (f"ModelError 1 the chat template of {folder} did not finish rendering one conversation within 1 s (a loop "
            "that does not end?); fix or replace the template")
    assert out.stdout.splitlines() == [said, said], out.stderr[-2000:]


def test_a_template_the_sandbox_refuses_names_the_template_not_the_row(tmp_path):
    from infopo_cli.data.formats import PreferencePair
    from infopo_cli.data.tokenization import encode_pair

    folder = build_tiny_model(tmp_path / "prying-model", chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ModelError, match=f"^the chat template of {folder} tries what jinja2's sandbox forbids .*__class__"):
        encode_pair(stack.load_tokenizer(str(folder)), PreferencePair("Q?", "A", "B", where="p.jsonl:3"), 512, 256)
