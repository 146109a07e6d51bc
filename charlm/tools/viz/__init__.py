"""``charlm viz``: what a model does at every character of a text.

:mod:`charlm.tools.viz.trace` computes (surprisal, top-5 next characters, every unit of every layer: h, c,
gates), :mod:`charlm.tools.viz.features` scores units against features of the text, :mod:`charlm.tools.viz.page`
writes the self-contained page; ``assets/colour.js`` holds the colour scale; :mod:`charlm.tools.viz.limits`
the length bound, without torch, for the command line.
"""
