"""`infopo export --gguf`: a run's adapter merged and written as a GGUF with an Ollama Modelfile, checked by reloading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from infopo_cli import files
from infopo_cli.errors import ConfigError
from infopo_cli.export.check import CheckResult, compare
from infopo_cli.export.gguf import QUANTS, check_quant, expected_bytes, write_gguf
from infopo_cli.export.merged import AdapterSource, merged_model
from infopo_cli.export.modelfile import modelfile_path, write_modelfile

LOSSLESS = ("f32", "f16", "bf16")  # a file of these must answer exactly as the merged model


def export_gguf(source: AdapterSource, out: Path, quant: str = "f16", overwrite: bool = False,
                check: bool = True, log: Callable[[str], None] = print) -> tuple[Path, Path, CheckResult | None]:
    """Write OUT.gguf and OUT.Modelfile; with `check`, compare the GGUF with the merged model.

    Both outputs are claimed before the model is loaded, so an existing one is refused at no cost.
    """
    check_quant(quant)
    modelfile = modelfile_path(out)
    if modelfile == out:
        raise ConfigError(f"--gguf {out}: the GGUF would be overwritten by its Modelfile; name it NAME.gguf")
    for line in files.clean_temporaries(out.parent):
        log(line)
    for path in (out, modelfile):
        files.claim_target(path, overwrite)
    model, tokenizer = merged_model(source, "fp32")
    size = expected_bytes(model, quant)
    intermediate = expected_bytes(model, "f16") if QUANTS[quant].by_llama_cpp else 0  # K-quants: from an f16 file
    files.check_free_space(out.parent, size + intermediate)
    log(f"writing {quant} GGUF, about {size / 2**20:,.0f} MiB" if size >= 2**20 else f"writing {quant} GGUF, about {size / 2**10:,.0f} KiB")
    with files.replacing(out) as tmp:  # K-quants too: llama.cpp's quantiser writes the temporary, renamed when whole
        for line in write_gguf(model, tokenizer, tmp, quant, model_name=_model_name(source)):
            log(line)
    write_modelfile(out, tokenizer)
    return out, modelfile, compare(model, tokenizer, out, lossy=quant not in LOSSLESS, quant=quant) if check else None


def _model_name(source: AdapterSource) -> str:
    """The base's name (used for llama.cpp's pre-tokenizer choice) plus the adapter's folder."""
    from infopo_cli.config import EMBEDDED_MODEL

    base = "SmolLM2-135M-Instruct" if source.base == EMBEDDED_MODEL else source.base.rstrip("/").split("/")[-1]
    return f"{base}-{source.adapter.name}"
