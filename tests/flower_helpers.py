"""Helpers for unit tests of strategy functions: build Flower messages as the SuperLink would."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def set_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def reply(node_id: int, arrays: dict[str, np.ndarray] | None, metrics: dict, client: dict | None = None, message_type: str = "train") -> Message:
    set_identity()
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=message_type)
    content = {"metrics": MetricRecord(metrics)}
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    if client is not None:
        content["client"] = ConfigRecord(client)
    return Message(RecordDict(content), reply_to=instruction)


def error_reply(node_id: int, reason: str, message_type: str = "train") -> Message:
    from flwr.app import Error

    set_identity()
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=message_type)
    return Message(Error(code=100, reason=reason), reply_to=instruction)
