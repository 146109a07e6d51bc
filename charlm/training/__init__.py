"""Layer 6, training with Lightning: the LightningModule, ``fit``, callbacks, NT-ASGD, loggers, run folders,
resume, fine-tuning, the precision a run trains in and checkpoint writing."""
