"""Messages as fedus puts them on the wire (fedus.transfer: students packed, one flat array per dtype):
tests build server messages and site replies the way the two real ends do."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedus.transfer import encode, from_wire, pack, reply_layouts, to_wire, unpack


def server_message(state: dict[str, torch.Tensor], config: dict, dtype: str = "fp32",
                   message_type: str = MessageType.TRAIN, node: int = 1) -> Message:
    """A message carrying `state` as the server sends it (FedusFedAvg.on_the_wire)."""
    packed, entries = to_wire(state, dtype)
    return Message(RecordDict({"arrays": ArrayRecord(packed), "config": ConfigRecord(dict(config) | entries)}),
                   dst_node_id=node, message_type=message_type)


def site_reply(arrays: dict[str, torch.Tensor], n: int, name: str, node: int = 0, dtype: str = "fp32") -> Message:
    """A site's train reply: its student packed in the wire dtype, its example count and name."""
    content = RecordDict({"arrays": ArrayRecord(pack(encode({k: v.clone() for k, v in arrays.items()}, dtype))),
                          "metrics": MetricRecord({"num-examples": n, "loss": 1.0}),
                          "site": ConfigRecord({"name": name})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def reply_arrays(reply: Message, ask: Message) -> dict[str, torch.Tensor]:
    """A site's reply arrays by name (still in the wire dtype), read as the server reads them."""
    sent, dtype = from_wire(ask.content["arrays"].to_torch_state_dict(), ask.content["config"])
    return unpack(reply.content["arrays"].to_torch_state_dict(), reply_layouts(sent, dtype)[0])
