"""Training: the only package that calls `backward()` (see docs/architecture.md, "Healing")."""
