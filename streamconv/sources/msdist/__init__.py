"""Per-rank (distributed) MindSpore checkpoints, read without a merge step.

A training run under semi-auto parallel leaves one safetensors file per rank
(``rank_N/<prefix>_rank_N-<epoch>_<step>.safetensors``) holding that rank's
*slice* of each parameter, plus a parallel strategy saying how the slices were
cut (FORMAT.md §8). This package answers, from headers and strategy alone,
which rank file holds which box of which full tensor:

* :mod:`.strategy` reads the strategy (JSON or protobuf, per rank or merged);
* :mod:`.ranks` finds the rank files of one checkpoint step;
* :mod:`.boxes` is the slicing rule: layout + rank -> box of the full tensor;
* :mod:`.assemble` puts them together and checks the pieces tile each tensor.

No tensor bytes are read here; streaming them is the caller's job.
"""
