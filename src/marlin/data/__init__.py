"""Training data: input discovery, the one clip sampler, the pretraining store (`marlin prepare` writes it), datasets,
distributed batch samplers and the collate that draws token masks per batch."""
