"""Stage 6 of the flow: running a plan against a save directory.

``savedir`` is the transaction (coordinator opens and finishes, workers commit
files, a lock keeps unrelated runs apart), ``convert`` executes a plan into
it, ``verify`` recomputes a finished one, ``progress`` and ``writeback`` are
what a long run needs on the side.
"""
