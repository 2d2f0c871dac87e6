"""Pictures: mask sheets, crop contact sheets, reconstructions and the embedded sample clip."""
