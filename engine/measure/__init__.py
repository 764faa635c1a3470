"""Measurements of models: SNR, similarity, perplexity, routing, prompt gates, super weights, lineage."""
