"""Layer 1, the cells: every recurrence charlm can train (:mod:`~charlm.cells.registry` names them), their
hand-written kernels through time, and the matrix products under them (:mod:`~charlm.cells.onednn_matmul`)."""
