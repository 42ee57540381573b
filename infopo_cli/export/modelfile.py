"""An Ollama Modelfile for an exported GGUF: FROM, the chat TEMPLATE in Ollama's syntax, stop tokens.

Ollama's templates are Go templates, not Jinja, so the chat format is recognised from its markers and
written out for the known families (ChatML, Llama 3, Mistral). For others the Modelfile leaves the
template to the GGUF's own `tokenizer.chat_template` and says so.
"""

from __future__ import annotations

from pathlib import Path

from infopo_cli.errors import ExportError
from infopo_cli.files import write_text

CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
LLAMA3 = ('<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
          '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
          '<|start_header_id|>assistant<|end_header_id|>\n\n')
MISTRAL = ('{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len $.Messages) 1) }}{{ $.System }}\n\n{{ end }}'
           '{{ .Content }}[/INST]{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{- end }}{{- end }}')
FAMILIES = (("<|im_start|>", CHATML, ["<|im_end|>", "<|im_start|>"]),
            ("<|start_header_id|>", LLAMA3, ["<|eot_id|>", "<|end_of_text|>"]),
            ("[INST]", MISTRAL, ["</s>", "[INST]"]))


def quote(text: str, what: str) -> str:
    """`text` as one Modelfile value that Ollama reads back unchanged. Its parser (parser/parser.go) knows no escapes:
    a value runs to the end of its line, or, opened with three double quotes, to the line that ends with three; the
    outer quotes are dropped and everything between kept, quotes and backslashes included. So one pair of quotes
    holds one line that does not start with a quote, three any text without three quotes in a row. Ollama drops
    other control characters, so a text with one is refused rather than written changed."""
    if '"""' in text:
        raise ExportError(f'{what} {text!r} contains """, which an Ollama Modelfile cannot hold')
    if any(ch not in "\t\n\r" and not ch.isprintable() for ch in text):
        raise ExportError(f"{what} {text!r} contains a control character, which Ollama's Modelfile reader drops")
    return f'"""{text}"""' if "\n" in text or "\r" in text or text.startswith('"') else f'"{text}"'


def modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None, base: Path | None = None) -> str:
    """The Modelfile's text; an ExportError (before anything is written) for a stop string it cannot hold. With `base`
    (a base GGUF), `gguf_name` is a LoRA adapter: FROM the base, ADAPTER the file."""
    name = modelfile_path(Path(gguf_name)).name
    lines = [f"FROM {quote(str(base), f'{name}: the base path')}", f"ADAPTER ./{gguf_name}"] if base else [f"FROM ./{gguf_name}"]
    template = chat_template or ""
    family = next((f for f in FAMILIES if f[0] in template), None)
    stops = list(family[2]) if family else []
    if family:
        lines.append("TEMPLATE " + quote(family[1], f"{name}: the template"))
    else:
        lines.append("# TEMPLATE: not one of ChatML / Llama 3 / Mistral; Ollama uses the GGUF's tokenizer.chat_template")
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += ["PARAMETER stop " + quote(stop, f"{name}: the stop string") for stop in stops]
    lines += ["PARAMETER temperature 0.7", "PARAMETER num_ctx 4096"]
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """The Modelfile written beside a GGUF file (`ollama create NAME -f` reads it)."""
    return gguf_path.with_suffix(".Modelfile")  # one per GGUF: `ollama create NAME -f model.Modelfile`


def write_modelfile(gguf_path: Path, text: str) -> Path:
    """Write `text` as the Modelfile of `gguf_path`, atomically; returns its path."""
    path = modelfile_path(gguf_path)
    write_text(path, text)
    return path
