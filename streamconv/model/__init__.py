"""Stage 2 of the flow: what the model is, worked out from tensor shapes and checked against the flags.

:func:`~.resolve.resolve_config` asks one module per concern — :mod:`.vocab`
(embedding, output layer, padding), :mod:`.layers` (which layers exist and
what kind each is), :mod:`.attention`, :mod:`.mlp`, :mod:`.norms` — and
returns a :class:`~.config.ModelConfig` with one :class:`~.config.LayerSpec`
per layer, so that layers may differ (dense-then-MoE models).
"""
