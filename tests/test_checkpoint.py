import pytest

from changefeed import ConfigurationError, FileCheckpoint, MemoryCheckpoint


def test_memory_checkpoint_round_trip():
    store = MemoryCheckpoint()
    assert store.load("feed") is None
    store.save("feed", {"_data": "8263"})
    assert store.load("feed") == {"_data": "8263"}


def test_file_checkpoint_survives_a_new_process_view(tmp_path):
    path = tmp_path / "cp.json"
    FileCheckpoint(path).save("a", "0000000001000000:00000003")
    FileCheckpoint(path).save("b", 7)
    reopened = FileCheckpoint(path)
    assert reopened.load("a") == "0000000001000000:00000003"
    assert reopened.load("b") == 7
    # Only the file itself is left behind: temporary files were renamed over it.
    assert [p.name for p in tmp_path.iterdir()] == ["cp.json"]


def test_file_checkpoint_rejects_garbage_with_a_clear_error(tmp_path):
    path = tmp_path / "cp.json"
    path.write_text("{not json")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        FileCheckpoint(path)


def test_file_checkpoint_in_a_missing_directory_is_a_configuration_error(tmp_path):
    store = FileCheckpoint(tmp_path / "missing" / "cp.json")
    with pytest.raises(ConfigurationError, match="cannot write checkpoint"):
        store.save("a", 1)


def test_file_checkpoint_file_is_indented_sorted_json(tmp_path):
    path = tmp_path / "cp.json"
    store = FileCheckpoint(path)
    store.save("tasks", "0000000001000000:00000011")
    store.save("app.notes", {"_data": "8263"})
    assert path.read_text() == (
        '{\n  "app.notes": {\n    "_data": "8263"\n  },\n'
        '  "tasks": "0000000001000000:00000011"\n}'
    )


def test_file_checkpoint_errors_word_for_word(tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("[1, 2]")
    with pytest.raises(ConfigurationError) as info:
        FileCheckpoint(garbage)
    assert info.value.message == f"checkpoint {garbage} does not hold a JSON object"

    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(ConfigurationError) as info:
        FileCheckpoint(folder)
    assert info.value.message == f"cannot read checkpoint {folder}: Is a directory"

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigurationError) as info:
        FileCheckpoint(broken)
    assert info.value.message.startswith(f"checkpoint {broken} is not valid JSON: ")

    missing = FileCheckpoint(tmp_path / "missing" / "cp.json")
    with pytest.raises(ConfigurationError) as info:
        missing.save("a", 1)
    assert info.value.message == (
        f"cannot write checkpoint {tmp_path / 'missing' / 'cp.json'}: No such file or directory")


def test_an_empty_checkpoint_file_holds_no_position(tmp_path):
    path = tmp_path / "cp.json"
    path.write_text("  \n")
    assert FileCheckpoint(path).load("tasks") is None
