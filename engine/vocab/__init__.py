"""Vocabularies: the output tokenizer, where each embedding and lm_head row comes from, chat templates."""
