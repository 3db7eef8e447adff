"""Message classes for MindSpore's strategy protobuf, built at import time.

MindSpore writes ``ckpt_strategy_rank_N.ckpt`` (and the merged
``src_strategy.ckpt``) as a serialized ``mindspore.straspb.ParallelStrategyMap``
from its ``node_strategy.proto``. We neither ship generated ``*_pb2.py`` code
(it is tied to one protobuf release) nor run ``protoc``: the descriptor below
mirrors that schema field for field (names, numbers, types) and the ``protobuf``
runtime turns it into message classes.

Two deliberate differences from the ``.proto`` text, neither of which changes the
wire format:

* MindSpore's ``required`` fields are declared ``optional`` here, so that a file
  lacking one parses and our own checks can refuse it with a message naming the
  file and parameter, instead of a bare "missing required fields".
* The classes live in a private descriptor pool, so they never clash with the
  same message names registered by an installed MindSpore in the same process.

Unknown fields (a newer MindSpore adding some) are kept by the parser and
ignored by us.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "mindspore.straspb"

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_U32, _I32, _I64, _STR, _MSG = _F.TYPE_UINT32, _F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_STRING, _F.TYPE_MESSAGE

#: message name -> [(field name, number, label, type, message type or None)], as in node_strategy.proto
_SCHEMA = {
    "ParallelStrategy": [("dim", 1, _REP, _U32, None)],
    "ParallelStrategys": [
        ("stage", 1, _OPT, _U32, None),  # required in MindSpore
        ("parallel_strategy", 2, _REP, _MSG, "ParallelStrategy"),
    ],
    "ParallelStrategyItem": [
        ("node_name", 1, _OPT, _STR, None),  # required
        ("parallel_strategys", 2, _OPT, _MSG, "ParallelStrategys"),  # required
    ],
    "DevMatrix": [("dim", 1, _REP, _U32, None)],
    "TensorMap": [("dim", 1, _REP, _I32, None)],
    "ParamSplitShape": [("dim", 1, _REP, _I64, None)],
    "IndicesOffset": [("dim", 1, _REP, _I64, None)],
    "ParallelLayouts": [
        ("dev_matrix", 1, _REP, _MSG, "DevMatrix"),
        ("tensor_map", 2, _REP, _MSG, "TensorMap"),
        ("param_split_shape", 3, _REP, _MSG, "ParamSplitShape"),
        ("indices_offset", 4, _REP, _MSG, "IndicesOffset"),
        ("field", 5, _OPT, _I32, None),  # required
        ("opt_weight_shard_step", 6, _OPT, _I32, None),  # required
        ("opt_weight_shard_size", 7, _OPT, _I32, None),  # required
    ],
    "ParallelLayoutItem": [
        ("param_name", 1, _OPT, _STR, None),  # required
        ("parallel_layouts", 2, _OPT, _MSG, "ParallelLayouts"),  # required
    ],
    "ParallelStrategyMap": [
        ("current_stage", 1, _OPT, _U32, None),  # required
        ("parallel_strategy_item", 2, _REP, _MSG, "ParallelStrategyItem"),
        ("parallel_layout_item", 3, _REP, _MSG, "ParallelLayoutItem"),
    ],
}


def _build_pool() -> descriptor_pool.DescriptorPool:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="streamconv/msdist/node_strategy.proto", package=_PACKAGE, syntax="proto2"
    )
    for msg_name, fields in _SCHEMA.items():
        m = fdp.message_type.add(name=msg_name)
        for fname, number, label, ftype, type_name in fields:
            f = m.field.add(name=fname, number=number, label=label, type=ftype)
            if type_name is not None:
                f.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return pool


_POOL = _build_pool()


def message_class(name: str):
    """The generated class of message ``name`` (e.g. ``"ParallelStrategyMap"``)."""
    desc = _POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(_POOL).GetPrototype(desc)  # protobuf 4.21


ParallelStrategyMap = message_class("ParallelStrategyMap")
ParallelLayouts = message_class("ParallelLayouts")
