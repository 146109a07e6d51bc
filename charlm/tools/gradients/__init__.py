"""``charlm gradients``: the vanishing / exploding gradient through the hidden state, measured per lag
(:mod:`charlm.tools.gradients.measure`), written as a CSV and a log-scale plot
(:mod:`charlm.tools.gradients.curves`)."""
