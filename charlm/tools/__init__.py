"""Layer 7, the tools built on training, evaluation and generation: compare, tune, serve, viz, gradients,
export, env. A tool never imports another."""
