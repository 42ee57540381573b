"""An Ollama Modelfile for an exported GGUF: FROM, the chat TEMPLATE in Ollama's syntax, stop tokens.

Ollama's templates are Go templates, not Jinja, so the chat format is recognised from its markers and
written out for the known families (ChatML, Llama 3, Mistral). For others the Modelfile leaves the
template to the GGUF's own `tokenizer.chat_template` and says so.
"""

from __future__ import annotations

from pathlib import Path

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


def modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None) -> str:
    lines = [f"FROM ./{gguf_name}"]
    template = chat_template or ""
    family = next((f for f in FAMILIES if f[0] in template), None)
    stops = list(family[2]) if family else []
    if family:
        lines.append(f'TEMPLATE """{family[1]}"""')
    else:
        lines.append("# TEMPLATE: not one of ChatML / Llama 3 / Mistral; Ollama uses the GGUF's tokenizer.chat_template")
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines += ["PARAMETER temperature 0.7", "PARAMETER num_ctx 4096"]
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_suffix(".Modelfile")  # one per GGUF: `ollama create NAME -f model.Modelfile`


def write_modelfile(gguf_path: Path, tokenizer) -> Path:
    from infopo_cli.files import write_text

    path = modelfile_path(gguf_path)
    write_text(path, modelfile(gguf_path.name, tokenizer.chat_template, tokenizer.eos_token))
    return path
