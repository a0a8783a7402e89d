"""Client errors of the infer task as HTTP 4xx answers (MONAI Label 0.8.5 turns any other exception into 500).

FastAPI's HTTPException raised inside `MONAILabelApp.infer` reaches the client with its status code
and `{"detail": message}`; the server keeps running and nothing is saved.
"""
from __future__ import annotations

from fastapi import HTTPException


class InferInputError(HTTPException):
    """A request the infer task cannot serve because of its input (400 bad input, 404 unknown id)."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(status_code=status_code, detail=message)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


def bad_request(message: str) -> InferInputError:
    return InferInputError(message, 400)


def not_found(message: str) -> InferInputError:
    return InferInputError(message, 404)
