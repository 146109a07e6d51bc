"""Layer 0, utilities that know nothing of models: errors, atomic writes, thread settings, on/off switches,
reading YAML, the CPU's features, the optional-plotting exception. They import nothing of charlm outside
``util``."""
