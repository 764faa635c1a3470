"""The recipe text: YAML with locations, the recipe document, rules for shared recipes."""
