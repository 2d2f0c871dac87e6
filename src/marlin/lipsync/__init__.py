"""Lip generation with a MARLIN face encoder (Wav2Lip-style): the generator, its training data, training and dubbing."""
