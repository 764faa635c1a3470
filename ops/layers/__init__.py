"""Layer surgery: drop_layers, slice_layers."""
