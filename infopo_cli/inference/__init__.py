"""Ask a trained model: load a run (base and tuned from one copy of the weights), generate, score, evaluate."""
