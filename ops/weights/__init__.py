"""Ops on weight matrices: low_rank, protect_super_weights."""
