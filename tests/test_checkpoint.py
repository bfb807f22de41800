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
