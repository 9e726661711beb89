"""`LoopbackGrid`: Flower's Grid interface delivering each message to an in-process ClientApp.

One Context per node, as a SuperNode keeps it; each message and reply is copied, as the
wire would deliver it. For tests that run the real ServerApp main against the real
ClientApp without a SuperLink (seconds instead of a process start per message).
"""

from __future__ import annotations

from copy import deepcopy
from types import SimpleNamespace
from uuid import uuid4

from flwr.app import Context, Message
from flwr.serverapp import Grid


class LoopbackGrid(Grid):
    """Each pushed message is handled at once by its node's ClientApp; `lost(msg)` decides which
    replies never come back (a site that died mid-protocol)."""

    def __init__(self, app, contexts: dict[int, Context], lost=lambda msg: False):
        self.app, self.contexts, self.lost = app, contexts, lost
        self.replies: dict[str, Message] = {}
        self.received: list[Message] = []  # everything the server was ever handed

    run = SimpleNamespace(run_id=1)

    def set_run(self, run) -> None:
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):
        return []

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            msg.metadata.__dict__["_src_node_id"] = 1
            # a copy, as the wire would deliver it (Flower's mod pops from the config it is given)
            delivered = Message(deepcopy(msg.content), msg.metadata.dst_node_id, msg.metadata.message_type,
                                group_id=msg.metadata.group_id)
            delivered.metadata.__dict__.update(_message_id=msg.metadata.message_id, _src_node_id=1)
            reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
            reply = Message(deepcopy(reply.content), reply_to=delivered) if not reply.has_error() else reply
            if not self.lost(msg):
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        out = [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
        self.received += out
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
