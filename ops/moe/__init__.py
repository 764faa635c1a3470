"""Mixture of Experts: stack_experts, init_gates."""
