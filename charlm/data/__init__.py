"""Layer 3, the data: the corpus file, the vocabulary, the split into streams and windows, and the
Lightning data module."""
