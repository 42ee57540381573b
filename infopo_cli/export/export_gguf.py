"""`infopo export`: merged weights or a GGUF (+ Ollama Modelfile) from a run folder, checked by reloading."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from infopo_cli.files import check_free_space, claim_target, usual_permissions
from infopo_cli.export.check import CheckResult, compare
from infopo_cli.export.gguf import QUANTS, check_quant, write_gguf
from infopo_cli.export.merged import AdapterSource, merged_model
from infopo_cli.export.modelfile import write_modelfile



def export_gguf(source: AdapterSource, out: Path, quant: str = "f16", overwrite: bool = False,
                check: bool = True) -> tuple[Path, Path, CheckResult | None]:
    """Write OUT.gguf and OUT.Modelfile; with `check`, compare the GGUF with the merged model."""
    check_quant(quant)
    claim_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = merged_model(source, "fp32")
    check_free_space(out.parent, int(sum(p.numel() for p in model.parameters()) * QUANTS[quant].bytes_per_weight))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".gguf", dir=out.parent)
    os.close(fd)
    try:
        write_gguf(model, tokenizer, Path(tmp), quant, model_name=_model_name(source))
        usual_permissions(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    modelfile = write_modelfile(out, tokenizer)
    return out, modelfile, compare(model, tokenizer, out) if check else None


def _model_name(source: AdapterSource) -> str:
    """The base's name (used for llama.cpp's pre-tokenizer choice) plus the adapter's folder."""
    from infopo_cli.config import EMBEDDED_MODEL

    base = "SmolLM2-135M-Instruct" if source.base == EMBEDDED_MODEL else source.base.rstrip("/").split("/")[-1]
    return f"{base}-{source.adapter.name}"
