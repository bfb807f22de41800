import pickle

import pytest

from changefeed import ALL, UNCHANGED, Change, ChangeFeed, ConfigurationError, Operation
from changefeed.errors import PermanentBackendError, ResumeError, TransientBackendError


def test_operation_values_match_bigchaindb():
    assert (ChangeFeed.INSERT, ChangeFeed.DELETE, ChangeFeed.UPDATE) == (1, 2, 4)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("insert", Operation.INSERT),
        ("insert,update", Operation.INSERT | Operation.UPDATE),
        (" Update , DELETE ", Operation.UPDATE | Operation.DELETE),
        ("all", Operation.INSERT | Operation.UPDATE | Operation.DELETE | Operation.TRUNCATE),
        ("truncate", Operation.TRUNCATE),
        ("insert, TRUNCATE", Operation.INSERT | Operation.TRUNCATE),
    ],
)
def test_operation_parse(text, expected):
    assert Operation.parse(text) == expected


@pytest.mark.parametrize("text", ["", "insert,upsert", "truncated", ","])
def test_operation_parse_rejects_unknown_words_and_names_the_valid_ones(text):
    with pytest.raises(ConfigurationError) as info:
        Operation.parse(text)
    assert "insert, delete, update, truncate" in str(info.value)


def test_unchanged_is_a_singleton_that_survives_pickling():
    assert pickle.loads(pickle.dumps(UNCHANGED)) is UNCHANGED
    assert repr(UNCHANGED) == "UNCHANGED"
    assert UNCHANGED is not None


def test_change_to_dict_lists_unchanged_columns_instead_of_inventing_values():
    change = Change(
        Operation.UPDATE, "public.t", new={"id": 1, "body": UNCHANGED}, old={"id": 1}, key={"id": 1}
    )
    data = change.to_dict()
    assert data["operation"] == "update"
    assert data["new"] == {"id": 1}
    assert data["unchanged"] == ["body"]


def test_change_pickles():
    change = Change(Operation.DELETE, "public.t", new=None, old={"id": 1}, position="00/1")
    assert pickle.loads(pickle.dumps(change)) == change


@pytest.mark.parametrize(
    "error", [ConfigurationError("x"), TransientBackendError("y"), PermanentBackendError("z"),
              ResumeError("w")]
)
def test_errors_pickle_with_their_message(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)


def test_a_change_is_immutable_and_copies_with_replace():
    import dataclasses

    change = Change(Operation.INSERT, "public.t", new={"id": 1}, key={"id": 1}, position="00/1")
    assert type(change) is Change
    assert (change.operation, change.table, change.new, change.old, change.key, change.position,
            change.committed_at, change.transaction, change.snapshot, change.meta) == (
        Operation.INSERT, "public.t", {"id": 1}, None, {"id": 1}, "00/1", None, None, False, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        change.table = "public.other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        del change.new
    copy = dataclasses.replace(change, snapshot=True)
    assert type(copy) is Change and copy.snapshot and copy.new == change.new
    assert copy != change and dataclasses.replace(copy, snapshot=False) == change


@pytest.mark.parametrize("text, message", [
    ("insert,upsert",
     "unknown operation 'upsert': use one or more of insert, delete, update, truncate, or all"),
    (" , ", "no operation given: use one or more of insert, delete, update, truncate"),
])
def test_operation_parse_errors_word_for_word(text, message):
    with pytest.raises(ConfigurationError) as info:
        Operation.parse(text)
    assert info.value.message == message


def test_operation_parse_all_with_other_words_is_still_all():
    assert Operation.parse("delete,all") == Operation.parse("all,insert") == (
        Operation.INSERT | Operation.UPDATE | Operation.DELETE | Operation.TRUNCATE)
    assert Operation.parse("update,all,delete") == ALL
