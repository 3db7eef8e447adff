"""The vocabulary every stage shares: errors, options, sizes, shapes, pages, a background worker.

Nothing here knows about checkpoints, Megatron or file formats; every other
sub-package may import from here, and this package imports from none of them.
"""
