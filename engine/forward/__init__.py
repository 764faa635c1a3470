"""The streamed forward pass: one decoder layer in memory at a time, family math, captures, tokenisation."""
