"""Values the weights cannot tell, read from a model description beside the input.

A hint is ``option field -> (value, origin)``, e.g. ``"rotary_base": (1000000,
"config.json rope_theta")``. The planner fills only the option fields the user
did not set (a flag given > the config file > streamconv's default) and says
where each value came from. :mod:`.hf_config` reads a Hugging Face
``config.json``.
"""
