"""Layer 4, the model: ``CharLM`` (:mod:`~charlm.model.char_lm`), its recurrent layers, the regularizers, the
C++ step routes for generation (:mod:`~charlm.model.fast_step`) and a checkpoint's model. No Lightning."""
