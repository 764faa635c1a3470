"""recipekit operations: model-level rewrites of LazyModels, one module per family."""
