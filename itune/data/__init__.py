"""Offline data preparation: sources -> rendering and masks -> packing -> Arrow shards + manifest.

Nothing in this package imports torch or deepspeed: a data node needs no GPU stack.
"""
