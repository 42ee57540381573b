"""The top tier: workflows that combine training, inference and reporting for one command (`infopo eval`)."""
