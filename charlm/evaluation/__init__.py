"""Layer 5, scoring text with a model: exact summed-NLL metrics, every character once, and dynamic
evaluation."""
