"""Foreign configs (mergekit-moe, mergekit-yaml): detection and one translator per format."""
