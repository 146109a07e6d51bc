"""``charlm export``: a checkpoint in a format other programs read (:mod:`~charlm.tools.export.onnx`)."""
