"""recipekit's model classes for outputs of `add_modules` (docs/architecture.md, "Added modules").

`math` holds the modules' math (used by the torch classes and by the streamed forward), `layers` the torch
modules and the mixins, `families` the transformers subclasses per family and their registration, which
`autoregister` runs when transformers is imported. This package itself imports neither torch nor transformers.
"""
