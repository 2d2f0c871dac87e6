"""Audio features as pure torch functions: log-mel spectrograms and their alignment with video frames."""
