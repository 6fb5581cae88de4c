"""Prompt sources read lazily: text files by line offsets, Hugging Face dataset columns through `datasets`."""

import json
import sys

import pytest

from prdp_core.errors import PromptError
from prdp_core.prompts import FilePrompts, draw_prompts, load_prompts, open_prompts

FILE_TEXT = "# a comment\na red fox\r\n\n   \n  a blue bird  \n#another\nune forêt, 森\nlast line without newline"
PROMPTS = ["a red fox", "a blue bird", "une forêt, 森", "last line without newline"]


def test_a_text_file_is_read_lazily_as_load_prompts_reads_it(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(FILE_TEXT.encode("utf-8"))
    lazy = open_prompts(str(path))
    assert isinstance(lazy, FilePrompts)
    assert list(lazy) == load_prompts(str(path)) == PROMPTS
    assert lazy[1:3] == PROMPTS[1:3] and lazy[-1] == PROMPTS[-1] and len(lazy) == 4
    # the epoch's draw is the one a list gives: runs started before prompts were read lazily resume the same
    assert draw_prompts(lazy, 3, 7, 2) == draw_prompts(PROMPTS, 3, 7, 2)


def test_a_text_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a fox\n\xff\xfe bad\n")
    with pytest.raises(PromptError, match=r"is not UTF-8 text \(line 2\)"):
        open_prompts(str(path))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(PromptError, match="holds no prompts"):
        open_prompts(str(tmp_path / "empty.txt"))


@pytest.fixture
def dataset_folder(tmp_path):
    """A dataset as `datasets` loads one from a local folder (a hub id works the same once cached)."""
    rows = [{"caption": "a red fox", "n": 1}, {"caption": "  ", "n": 2}, {"caption": None, "n": 3},
            {"caption": "a blue bird", "n": 4}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


def test_a_dataset_column_is_read_with_its_default_split_and_column(dataset_folder):
    pytest.importorskip("datasets")
    expected = ["a red fox", "a blue bird"]  # rows without text skipped
    assert list(open_prompts(f"hf:{dataset_folder}")) == expected
    assert list(open_prompts(f"hf:{dataset_folder}:train:caption")) == expected
    assert load_prompts(f"hf:{dataset_folder}") == expected


@pytest.mark.parametrize("suffix, message", [
    (":train:n", r"has no text column n; name one of its text columns \(caption\)"),
    (":test", r"\(split test\) could not be loaded \(Unknown split"),
])
def test_a_wrong_dataset_column_or_split_is_one_sentence(dataset_folder, suffix, message):
    pytest.importorskip("datasets")
    with pytest.raises(PromptError, match=message):
        open_prompts(f"hf:{dataset_folder}{suffix}")


def test_a_hub_dataset_offline_and_not_cached_is_one_sentence():
    pytest.importorskip("datasets")  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(PromptError, match="someone/not-cached is not in the local cache and the hub cannot be "
                                          "reached; download it once while online"):
        open_prompts("hf:someone/not-cached")


def test_a_dataset_without_the_datasets_library_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(PromptError, match="need the datasets library; install it with pip install datasets"):
        open_prompts("hf:someone/prompts")


def test_a_file_with_other_line_breaks_is_split_as_load_prompts_splits_it(tmp_path):
    path = tmp_path / "old_mac.txt"
    path.write_bytes("a red fox\ra blue bird\u2028a green frog\n".encode("utf-8"))
    assert list(open_prompts(str(path))) == load_prompts(str(path)) == ["a red fox", "a blue bird", "a green frog"]
