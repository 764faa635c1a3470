"""The `recipekit` package itself (pyproject.toml maps it here, so the repository keeps its engine/ + ops/ layout).

recipekit builds language-model checkpoints from others: `recipekit.engine` is the Python API, `recipe` the
command line.

Importing `recipekit` makes transformers' Auto classes know the model types of `add_modules` outputs
(`recipekit_llama`, ...), so `AutoModelForCausalLM.from_pretrained` loads them without code from the model
folder; it imports neither transformers nor torch itself (`engine/modeling/autoregister.py`).
"""
from recipekit.engine.modeling.autoregister import register_with_transformers

register_with_transformers()
