"""runio/paths.py on local paths (the gs:// forms are in test_cloud_paths.py)."""

import json
import os

import pytest

from simbal_jax.runio import paths


def test_local_and_uri_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.is_local("runs/x") and paths.is_local("/a/b") and not paths.is_local("gs://b/x")
  assert paths.absolute("runs/x") == os.path.join(str(tmp_path), "runs", "x")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.absolute("~/y") == os.path.join(str(tmp_path), "home", "y")
  assert os.fspath(paths.resolve("gs://b/x")) == "gs://b/x"
  assert paths.relpath("runs/x/ckpt/3", "runs/x") == "ckpt/3"
  assert paths.relpath("/a/b", "/a/c/d") == "../../b"
  assert paths.dirname("/a/b/c") == "/a/b" and paths.dirname("gs://b/x/y") == "gs://b/x"
  assert paths.commonpath(["/a/b/c", "/a/b/d/e", "/a/b"]) == "/a/b"
  with pytest.raises(ValueError, match="same filesystem"):
    paths.relpath("gs://b/x", "/a")
  with pytest.raises(ValueError, match="different filesystems"):
    paths.commonpath(["gs://b/x", "/a"])


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "a.json"
  paths.write_text(target, "old")
  paths.write_json(target, {"b": 1, "a": [1, 2]})
  assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
  assert target.read_text().index('"a"') < target.read_text().index('"b"')  # sorted keys
  assert os.listdir(tmp_path) == ["a.json"]
  paths.copy_file(target, tmp_path / "copy.json")
  assert (tmp_path / "copy.json").read_bytes() == target.read_bytes()


def test_check_dir_path_names_the_field(tmp_path):
  paths.check_dir_path(tmp_path / "new" / "deeper", "workdir")  # creatable: no error
  paths.check_dir_path("gs://bucket/run", "workdir")  # not checked beyond emptiness
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match=r"^workdir is empty"):
    paths.check_dir_path(" ", "workdir")
  with pytest.raises(ValueError, match=r"^workdir .*: it is a file, not a directory$"):
    paths.check_dir_path(tmp_path / "f", "workdir")
  with pytest.raises(ValueError, match=r"f is a file, not a directory$"):
    paths.check_dir_path(tmp_path / "f" / "sub", "workdir")
  assert not (tmp_path / "new").exists()  # nothing created
