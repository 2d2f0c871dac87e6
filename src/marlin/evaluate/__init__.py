"""Downstream evaluation: labelled video sets, splits, metrics, linear probing and fine-tuning.

Submodules are imported on use (``marlin.evaluate.probe``, ``marlin.evaluate.finetune``) so that importing this
package stays cheap.
"""
