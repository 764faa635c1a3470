"""From a recipe to a model directory: build, plan, kernel evaluation, writer, card, lock."""
