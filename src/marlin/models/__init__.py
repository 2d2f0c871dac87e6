"""The network and its files: config, registry of variants, layers, encoder, decoder, the `Marlin` model, checkpoint
formats and the download cache. `marlin/__init__.py` re-exports the public part."""
