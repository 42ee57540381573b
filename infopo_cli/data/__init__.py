"""Preference data: sources, row formats, loading and checks, tokenisation, token cache, batching."""
