"""Preference losses: the formulas, the MI priors and registry, and the types they read."""
