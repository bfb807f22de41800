"""The change dict (``Change.to_dict()``) read back: `changefeed.formats.change_dict`."""

from __future__ import annotations

import pytest

from changefeed.formats.change_dict import change_from_dict


def test_change_from_dict_rejects_what_is_not_a_change():
    from changefeed.errors import DecodeError

    with pytest.raises(DecodeError, match="not a change"):
        change_from_dict({"type": "insert", "model": "T", "data": {}})
