"""Reading inputs: safetensors headers, open input files, the Hub, model sources. Never torch."""
