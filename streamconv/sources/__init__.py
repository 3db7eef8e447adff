"""Stage 1 of the flow: where the input's bytes are and what each tensor is.

``header`` validates safetensors headers, ``locate`` finds the weight files of
any checkpoint layout, ``schemes`` name what each tensor means (one module per
input naming scheme), ``index`` ties them into a :class:`SourceIndex` of
canonical name -> bytes on disk, ``mapped`` reads row blocks with positioned reads
and ``prefetch`` warms the page cache. Only headers are read while planning.
"""
