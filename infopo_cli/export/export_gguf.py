"""`infopo export --gguf`: a run's adapter merged and written as a GGUF with an Ollama Modelfile, checked by reloading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from infopo_cli import files
from infopo_cli.export.check import CheckResult, before_naming, compare
from infopo_cli.export.gguf import QUANTS, check_quant, expected_bytes, write_gguf
from infopo_cli.export.merged import AdapterSource, merged_model
from infopo_cli.export.modelfile import modelfile, write_modelfile
from infopo_cli.export.outputs import claim_gguf, local_model
from infopo_cli.config import EMBEDDED_MODEL
from infopo_cli.model.source import merged_mark

LOSSLESS = ("f32", "f16", "bf16")  # a file of these must answer exactly as the merged model


def export_gguf(source: AdapterSource, out: Path, quant: str = "f16", overwrite: bool = False,
                check: bool = True, log: Callable[[str], None] = print) -> tuple[Path, Path, CheckResult | None]:
    """Write OUT.gguf and OUT.Modelfile; with `check`, compare the GGUF with the merged model.

    Both outputs are claimed before the model is loaded, so an existing one is refused at no cost, and the
    Modelfile's text is made before the GGUF is written, so a stop string it cannot hold leaves no file behind.
    """
    check_quant(quant)
    for line in files.clean_temporaries(out.parent):
        log(line)
    modelfile_path = claim_gguf(out, overwrite, reads=[base] if (base := local_model(source.base)) else [])
    model, tokenizer = merged_model(source, "fp32")
    text = modelfile(out.name, tokenizer.chat_template, tokenizer.eos_token)
    size = expected_bytes(model, quant)
    intermediate = expected_bytes(model, "f16") if QUANTS[quant].by_llama_cpp else 0  # K-quants: from an f16 file
    files.check_free_space(out.parent, size + intermediate)
    log(f"writing {quant} GGUF, about {size / 2**20:,.0f} MiB" if size >= 2**20 else f"writing {quant} GGUF, about {size / 2**10:,.0f} KiB")
    with files.replacing(out) as tmp:  # K-quants too: llama.cpp's quantiser writes the temporary, renamed when whole
        for line in write_gguf(model, tokenizer, tmp, quant, model_name=_model_name(source),
                               merged=merged_mark(source.adapter, source.base, source.related)):
            log(line)
        # checked before it takes its name: a check stopped half-way (Ctrl-C) leaves no unchecked OUT.gguf that the
        # same command, run again, would refuse to replace
        result, failed = before_naming(lambda: compare(model, tokenizer, tmp, lossy=quant not in LOSSLESS, quant=quant,
                                                       shown=out), out) if check else (None, None)
    write_modelfile(out, text)
    if failed is not None:
        raise failed
    return out, modelfile_path, result


def _model_name(source: AdapterSource) -> str:
    """The base's name (used for llama.cpp's pre-tokenizer choice) plus the adapter's folder."""
    base = "SmolLM2-135M-Instruct" if source.base == EMBEDDED_MODEL else source.base.rstrip("/").split("/")[-1]
    return f"{base}-{source.adapter.name}"
