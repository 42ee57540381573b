"""Export: merged weights, GGUF (+ Ollama Modelfile), and the reload check."""
