"""charlm: character-level recurrent language models of Shakespeare, AWD-LSTM style."""

__version__ = "0.1.0"
