"""Lip synchronisation: a SyncNet-style audio-visual expert on the MARLIN encoder, its training and sync scoring."""
