"""Stage 3 of the flow: what Megatron-LM expects, independent of the file container.

``parallel`` names the rank coordinates (TP, PP, EP, ETP) and which ranks
hold files; ``rules`` are the declarative source-row selections each parameter
kind needs at a coordinate; ``layout`` lists the keys of a rank's state dict in
Megatron's order with the rule for each; ``args`` is the ``args`` namespace.
"""
