"""Measuring frozen features and predictions: labelled video sets, splits, metrics, features of `marlin extract`
outputs and linear probing (`marlin probe`). Training an encoder (fine-tuning) lives in :mod:`marlin.train.finetune`.

Submodules are imported on use (``marlin.evaluate.probe``, ``marlin.evaluate.metrics``) so that importing this package
stays cheap.
"""
