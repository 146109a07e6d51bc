"""Layer 0, utilities that know nothing of models: errors, atomic writes, thread settings, on/off switches,
the optional-plotting exception. They import nothing of charlm."""
