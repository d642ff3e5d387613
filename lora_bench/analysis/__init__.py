"""Records -> tidy tables -> summaries, significance tests, variance components, tuning and item-level statistics."""
