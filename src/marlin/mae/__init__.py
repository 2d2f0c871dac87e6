"""The masked-autoencoder objective as pure functions: token masks (face-guided and baselines), patchify / targets,
losses and the patch critic. Nothing here reads files or knows about training loops."""
