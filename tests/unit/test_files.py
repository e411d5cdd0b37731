"""Pure logic over files the test makes itself: migration discovery, model-folder verification."""

import json

from service.db import load_migrations
from service.engine.weights import MANIFEST, folder_checksums, verify_model


def test_migrations_are_numbered_in_order_and_checksummed():
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial"
    assert len(migrations[0].checksum) == 64
    assert "CREATE TABLE adapters" in migrations[0].sql


def test_verify_model_accepts_a_matching_folder_and_rejects_changes(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    assert verify_model(tmp_path) is None  # no manifest yet
    (tmp_path / MANIFEST).write_text(json.dumps({"files": folder_checksums(tmp_path)}))
    assert verify_model(tmp_path)["files"].keys() == {"config.json", "model.safetensors"}

    (tmp_path / "model.safetensors").write_bytes(b"\x01" * 64)  # corrupted weights
    assert verify_model(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "config.json").unlink()  # a missing file
    assert verify_model(tmp_path) is None
    (tmp_path / MANIFEST).write_text("not json")
    assert verify_model(tmp_path) is None
