"""What ops may use: schema base types, the graph, layers, name tables, kernels, the Probe protocol.

Nothing here imports an op or another engine subpackage."""
