"""Merging models that share an architecture: the merge op, its method table, one module per method family."""
