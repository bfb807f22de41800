"""The application of the sync tests: tokens of two owners and validators with a rule."""

from __future__ import annotations

import asyncio

TOKENS = {"alice-phone": "alice", "alice-laptop": "alice", "bob-phone": "bob"}


class App:
    """``--app sync_app:App``: authenticate by a token table; refuse titles saying so."""

    def authenticate(self, token: str) -> str | None:
        if token == "revoked":
            raise PermissionError("this token was revoked")
        return TOKENS.get(token)

    def validate_create(self, owner_id: str, **diff: object) -> bool:
        return diff["json_data"].get("title") != "forbidden"  # type: ignore[union-attr]

    async def validate_update(self, owner_id: str, **diff: object) -> bool:
        await asyncio.sleep(0)  # validators may be async
        return diff["json_data"].get("title") != "forbidden"  # type: ignore[union-attr]

    def validate_delete(self, owner_id: str, **diff: object) -> bool:
        return diff["json_data"].get("id") != 999  # type: ignore[union-attr]


def authenticate(token: str) -> str | None:
    """``--app sync_app:authenticate``-style module functions work too (module attribute)."""
    return TOKENS.get(token)
