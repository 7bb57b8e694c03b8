import os

from lora_dist import files


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    files.atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_publish_folder_replaces_an_existing_folder_whole(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"x")
    tmp = files.temporary_folder(target)
    (tmp / "weights.bin").write_bytes(b"y")
    files.publish_folder(tmp, target)
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_stale_temporaries_of_one_name_are_removed_and_others_kept(tmp_path):
    leftovers = [files.temporary_folder(tmp_path / "adapter"), tmp_path / ".adapter.tmp-123"]
    leftovers[1].write_text("half")
    (tmp_path / ".adapter.old-9").mkdir()
    keep = tmp_path / ".latest.tmp-1"
    keep.write_text("other name")
    removed = files.remove_stale_temporaries(tmp_path, "adapter")
    assert len(removed) == 3 and all(not os.path.lexists(p) for p in removed)
    assert keep.exists()
