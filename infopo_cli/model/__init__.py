"""The model stack: loading the 4-bit base with LoRA, compute precision, the embedded default and GGUF import."""
