"""`overwrite` replaces only a checkpoint or an empty directory; stale staging is ours only."""

import os
from pathlib import Path

import numpy as np
import pytest

from jaxshrink import CheckpointError, UsageError, load, save
from jaxshrink.cli import main
from jaxshrink.export import export_safetensors
from jaxshrink.export.overwrite import MARKER, MARKER_TEXT, remove_stale_staging

TREE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
NEW = {"w": np.full((3, 4), 7.0, np.float32)}
RECIPE = "model: digits-cnn\ndata: digits\nstages: []\n"


def snapshot(root: Path) -> dict[str, bytes]:
  """Every file under `root` (symlinks not followed), by relative path, with its bytes."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = Path(dirpath) / name
      out[str(path.relative_to(root))] = b"->" + os.readlink(path).encode() if (
        path.is_symlink()
      ) else path.read_bytes()  # fmt: skip
  return out


@pytest.fixture
def home(tmp_path):
  """A `$HOME`-like directory: dotfiles and a thesis."""
  home = tmp_path / "home"
  (home / ".ssh").mkdir(parents=True)
  (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
  (home / ".bashrc").write_text("export PATH=$PATH\n")
  (home / "thesis.txt").write_text("four years of work\n")
  return home


def test_home_like_directory_is_refused_and_untouched(home):
  before = snapshot(home)
  with pytest.raises(UsageError, match=r"Refusing to overwrite .*home.*not a jaxshrink "
                     r"checkpoint.*3 entries \(\.bashrc, \.ssh, thesis\.txt\)"):  # fmt: skip
    save(home, TREE, overwrite=True)
  assert snapshot(home) == before
  assert sorted(p.name for p in home.parent.iterdir()) == ["home"]  # no staging left


def test_current_directory_is_refused(tmp_path, monkeypatch):
  work = tmp_path / "work"
  work.mkdir()
  (work / "notes.md").write_text("mine")
  monkeypatch.chdir(work)
  with pytest.raises(UsageError, match=r"Refusing to overwrite `.*work`.*notes\.md"):
    save(".", TREE, overwrite=True)
  assert snapshot(work) == {"notes.md": b"mine"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_file_is_refused(tmp_path):
  target = tmp_path / "model.bin"
  target.write_bytes(b"\x00\x01weights")
  with pytest.raises(UsageError, match=r"`.*model\.bin`: it is a file"):
    save(target, TREE, overwrite=True)
  assert target.read_bytes() == b"\x00\x01weights"


def test_symlinks_are_refused_whatever_they_point_to(tmp_path, home):
  real = save(tmp_path / "real", TREE)
  checkpoint_before, home_before = snapshot(real), snapshot(home)
  for name, points_to in (("to_ckpt", real), ("to_home", home)):
    link = tmp_path / name
    link.symlink_to(points_to, target_is_directory=True)
    with pytest.raises(UsageError, match=rf"`.*{name}`: it is a symlink \(to `{points_to}`\)"):
      save(link, NEW, overwrite=True)
    assert link.is_symlink() and Path(os.readlink(link)) == points_to
  assert snapshot(real) == checkpoint_before and snapshot(home) == home_before
  np.testing.assert_array_equal(load(real)["w"], TREE["w"])


def test_checkpoint_with_user_files_beside_it_is_refused(tmp_path):
  target = save(tmp_path / "ck", TREE)
  (target / "README.txt").write_text("what this checkpoint is")
  with pytest.raises(UsageError, match=r"besides the checkpoint it holds README\.txt"):
    save(target, NEW, overwrite=True)
  assert (target / "README.txt").read_text() == "what this checkpoint is"
  np.testing.assert_array_equal(load(target)["w"], TREE["w"])


def test_empty_directory_and_checkpoint_are_replaced(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  save(empty, TREE, overwrite=True)
  np.testing.assert_array_equal(load(empty)["w"], TREE["w"])
  save(empty, NEW, overwrite=True)  # now a checkpoint: replaced too
  np.testing.assert_array_equal(load(empty)["w"], NEW["w"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
  with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
    save(empty, TREE)


def _stale(tmp_path: Path, suffix: str) -> Path:
  path = tmp_path / f".ck.partial-{suffix}"
  path.mkdir()
  return path


def test_only_our_staging_directories_are_reclaimed(tmp_path, home):
  target = tmp_path / "ck"
  ours_marked = _stale(tmp_path, "0123abcd")
  (ours_marked / MARKER).write_text(MARKER_TEXT)
  (ours_marked / "arrays").mkdir()
  ours_empty = _stale(tmp_path, "multihost2")
  ours_complete = tmp_path / ".ck.partial-deadbeef"  # an exchanged previous checkpoint
  save(ours_complete, TREE)
  user_same_pattern = _stale(tmp_path, "feedf00d")  # our name pattern, but not our content
  (user_same_pattern / "data.csv").write_text("1,2,3")
  wrong_pattern = _stale(tmp_path, "not-hex!")
  (wrong_pattern / MARKER).write_text(MARKER_TEXT)
  link = tmp_path / ".ck.partial-0000beef"  # our pattern, a symlink to the user's home
  link.symlink_to(home, target_is_directory=True)
  home_before = snapshot(home)

  removed = remove_stale_staging(target)
  assert sorted(removed) == sorted([ours_marked, ours_empty, ours_complete])
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
    [".ck.partial-feedf00d", ".ck.partial-not-hex!", ".ck.partial-0000beef", "home"]
  )
  assert (user_same_pattern / "data.csv").read_text() == "1,2,3"
  assert link.is_symlink() and snapshot(home) == home_before
  save(target, TREE)  # a save runs the same reclaiming
  assert (user_same_pattern / "data.csv").read_text() == "1,2,3"
  assert snapshot(home) == home_before


def run(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_cli_compress_refuses_before_running_the_recipe(capsys, tmp_path, home, monkeypatch):
  from jaxshrink import recipes

  def never(*args, **kwargs):
    raise AssertionError("the recipe ran before the --out check")

  monkeypatch.setattr(recipes, "run_recipe", never)
  recipe = tmp_path / "r.yaml"
  recipe.write_text(RECIPE)
  before = snapshot(home)
  code, _, err = run(capsys, "compress", str(recipe), "--out", str(home), "--overwrite")
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "Refusing to overwrite" in err and "thesis.txt" in err
  assert snapshot(home) == before
  link = tmp_path / "link"
  link.symlink_to(home, target_is_directory=True)
  code, _, err = run(capsys, "compress", str(recipe), "--out", str(link), "--overwrite")
  assert code == 2 and "symlink" in err and len(err.strip().splitlines()) == 1
  monkeypatch.chdir(home)
  code, _, err = run(capsys, "compress", str(recipe), "--out", ".", "--overwrite")
  assert code == 2 and "Refusing to overwrite" in err
  assert snapshot(home) == before


def test_cli_export_overwrites_only_its_own_safetensors(capsys, tmp_path):
  checkpoint = save(tmp_path / "ck", TREE)
  ours = export_safetensors(TREE, tmp_path / "ours.safetensors")
  other = tmp_path / "notes.safetensors"
  other.write_text("not a tensor file")
  code, _, err = run(capsys, "export", str(checkpoint), "--to", "safetensors", str(other),
                     "--overwrite")  # fmt: skip
  assert code == 2 and "not a safetensors file written by jaxshrink" in err
  assert other.read_text() == "not a tensor file"
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "keep.txt").write_text("keep")
  code, _, err = run(capsys, "export", str(checkpoint), "--to", "safetensors", str(folder),
                     "--overwrite")  # fmt: skip
  assert code == 2 and "is a directory" in err and (folder / "keep.txt").read_text() == "keep"
  code, out, _ = run(capsys, "export", str(checkpoint), "--to", "safetensors", str(ours),
                     "--overwrite")  # fmt: skip
  assert code == 0 and "wrote" in out
