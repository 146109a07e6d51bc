"""Layer 0, the C++ sources (``csrc/``) and the one builder and loader of their libraries
(:mod:`~charlm.native.build`). The libraries' users (the cells' kernels, the model's fast step) are above."""
