"""streamconv: stream a MindSpore Transformers checkpoint into a Megatron-LM core checkpoint.

Library use::

    from streamconv import ConvertOptions, convert
    summary = convert(ConvertOptions(load_dir="ckpt/", save_dir="out/",
                                     target_tensor_parallel_size=2, seq_length=4096))

See ``streamconv --help`` and the README for every option.
"""

from .convert import convert
from .errors import FlagError, InputError, PathError, StreamconvError, WriteError
from .options import ConvertOptions
from .plan import build_plan, describe

__version__ = "0.1.0"

__all__ = [
    "ConvertOptions", "convert", "build_plan", "describe", "StreamconvError", "InputError",
    "FlagError", "PathError", "WriteError", "__version__",
]
