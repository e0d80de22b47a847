"""gRPC status codes by name and number, and the StepResult that answers a frame with an error.

A StepResult carries its error's status as gRPC's number (``StepResult.status``), over gRPC and over
MQTT alike; every tier builds its error answers here.
"""

from __future__ import annotations

import grpc

from protos import splitglm_pb2 as pb

STATUS_CODES = {code.name: code.value[0] for code in grpc.StatusCode}  # "NOT_FOUND" -> 5
STATUS_NAMES = {number: name for name, number in STATUS_CODES.items()}  # 5 -> "NOT_FOUND"


def status_number(status: str | int | grpc.StatusCode) -> int:
    """A status given by name, number or ``grpc.StatusCode`` as its number (UNKNOWN for a name it lacks)."""
    if isinstance(status, grpc.StatusCode):
        return status.value[0]
    if isinstance(status, int):
        return status
    return STATUS_CODES.get(status, STATUS_CODES["UNKNOWN"])


def error_result(session_id: str, seq: int, status: str | int | grpc.StatusCode, message: str) -> pb.StepResult:
    """A StepResult answering step ``seq`` of ``session_id`` with an error and its gRPC status."""
    return pb.StepResult(session_id=session_id, seq=seq, error=message, status=status_number(status))
