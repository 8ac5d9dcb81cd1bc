"""Unit tests for shardquant.data: text sources and token windows (no network, no model)."""

from __future__ import annotations

import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from shardquant.data import load_text, token_windows
from shardquant.errors import UserError

VOCAB = 5000


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """Word ``w<i>`` is token ``i``: a text ``w0 w1 ... w<n-1>`` tokenizes to ``arange(n)``."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["[UNK]"] = VOCAB
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    # A small model_max_length: long texts would trigger transformers' length warning.
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=16)


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the ``datasets`` module by a fake that records calls and fails."""
    calls: list = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


# ---- load_text: every source kind ----------------------------------------------------------


def test_txt_and_md_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# title\n", encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt"), key="calib.path") == "hello\nworld\n"
    assert load_text(tmp_path / "b.md", key="calib.path") == "# title\n"


def test_txt_bom_and_crlf_are_normalized(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n")
    assert load_text(str(tmp_path / "a.txt"), key="calib.path") == "one\ntwo\n"


def test_folder_joins_txt_files_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.md").write_text("not a .txt", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("nested", encoding="utf-8")
    assert load_text(str(tmp_path), key="calib.path") == "first\n\nsecond"


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}, {"text": None}, {"text": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_text(str(path), key="calib.path") == "alpha\n\nbeta\n\ngamma"


def test_json_list_with_custom_field(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"body": "x y"}, {"body": "z"}], indent=2), encoding="utf-8")
    assert load_text(str(path), key="eval.path", text_field="body") == "x y\n\nz"


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert load_text(str(path), key="calib.path") == "a\n\nb"


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["one", None, "three"]}), path)
    assert load_text(str(path), key="calib.path") == "one\n\nthree"


def test_datasets_name_goes_to_datasets(monkeypatch):
    calls = []

    class FakeDataset:
        column_names = ["text", "label"]

        def __getitem__(self, name):
            return ["row one", "", "row three"]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    text = load_text("wikitext", key="calib.path", dataset_config="wikitext-2-raw-v1", split="test")
    assert text == "row one\n\n\n\nrow three"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    with pytest.raises(UserError, match=r"^calib\.path: .*no column 'body' \(columns: text, label\)$"):
        load_text("wikitext", key="calib.path", text_field="body")


# ---- load_text: errors ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["./nope.txt", "/x/y", "~/surely-not-here-4711.txt",
                                    "nope.txt", "data/nope.jsonl", "../up/nope"])
def test_missing_path_is_user_error_without_hub(no_hub, source):
    with pytest.raises(UserError, match=rf"^calib\.path: no such file or folder: {source}$"):
        load_text(source, key="calib.path")
    assert no_hub == []


def test_bare_name_failing_in_datasets_is_user_error(no_hub):
    with pytest.raises(UserError) as info:
        load_text("some-org/some-corpus", key="calib.path")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("calib.path: some-org/some-corpus is no local file or folder")
    assert "dataset 'some-org/some-corpus'" in msg and "ConnectionError" in msg
    assert len(no_hub) == 1


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_empty_text_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=r"^calib\.path: .*empty\.txt holds no text$"):
        load_text(str(path), key="calib.path")


def test_empty_sources_of_every_kind(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    (tmp_path / "e.json").write_text("[]", encoding="utf-8")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    for name in ["e.jsonl", "e.json", "e.parquet"]:
        with pytest.raises(UserError, match=rf"^eval\.path: .*{name} holds no text$"):
            load_text(str(tmp_path / name), key="eval.path")


def test_folder_without_txt(tmp_path):
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"^calib\.path: folder .* holds no \.txt files$"):
        load_text(str(tmp_path), key="calib.path")


def test_undecodable_file(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"ok \xff\xfe\x00 bad")
    with pytest.raises(UserError, match=r"^calib\.path: .*bin\.txt is not UTF-8 text"):
        load_text(str(path), key="calib.path")


def test_undecodable_file_in_folder_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\xc3\x28")
    with pytest.raises(UserError, match=r"^calib\.path: .*b\.txt is not UTF-8 text"):
        load_text(str(tmp_path), key="calib.path")


def test_jsonl_missing_field_names_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b", "id": 2}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"^calib\.path: .*d\.jsonl line 2 has no field 'text' \(fields: body, id\)$"):
        load_text(str(path), key="calib.path")


def test_json_list_of_non_objects(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(UserError, match=r"^calib\.path: .*d\.json item 0 is a str, expected an object with a 'text' field$"):
        load_text(str(path), key="calib.path")


def test_json_non_string_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"^calib\.path: .*line 1 field 'text' is a int, expected a string$"):
        load_text(str(path), key="calib.path")


def test_invalid_json(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    (tmp_path / "b.json").write_text('[{"text": "a"},', encoding="utf-8")
    with pytest.raises(UserError, match=r"^calib\.path: .*a\.jsonl line 2 is not valid JSON"):
        load_text(str(tmp_path / "a.jsonl"), key="calib.path")
    with pytest.raises(UserError, match=r"^calib\.path: .*b\.json is not valid JSON"):
        load_text(str(tmp_path / "b.json"), key="calib.path")


def test_parquet_missing_column_names_columns(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a"], "id": [1]}), path)
    with pytest.raises(UserError, match=r"^eval\.path: .*d\.parquet has no column 'text' \(columns: content, id\)$"):
        load_text(str(path), key="eval.path")


def test_parquet_non_string_column(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(UserError, match=r"^calib\.path: .*column 'text' holds int64, expected strings$"):
        load_text(str(path), key="calib.path")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"^calib\.path: .*d\.parquet is not a readable parquet file"):
        load_text(str(path), key="calib.path")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^calib\.path: .*d\.csv is not a supported file type"):
        load_text(str(path), key="calib.path")


def test_empty_source_string():
    with pytest.raises(UserError, match=r"^calib\.path: empty text source"):
        load_text("  ", key="calib.path")


# ---- token_windows ---------------------------------------------------------------------------


def test_random_windows_are_slices_and_reproducible(tok):
    text = words(1000)
    kw = dict(n_samples=16, seq_len=32, mode="random", key="calib")
    a = token_windows(tok, text, seed=0, **kw)
    b = token_windows(tok, text, seed=0, **kw)
    c = token_windows(tok, text, seed=1, **kw)
    assert a.shape == (16, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    starts = a[:, 0]
    assert torch.equal(a, starts[:, None] + torch.arange(32))  # token i is word i: real slices
    assert int(starts.min()) >= 0 and int(starts.max()) <= 1000 - 32
    assert len(set(starts.tolist())) > 1


def test_random_windows_cover_the_whole_range(tok):
    # seq_len + 1 tokens: exactly two possible starts, both drawn with many samples.
    w = token_windows(tok, words(9), n_samples=64, seq_len=8, seed=3, mode="random", key="calib")
    assert set(w[:, 0].tolist()) == {0, 1}


@settings(max_examples=30, deadline=None)
@given(n_tokens=st.integers(3, 400), seq_len=st.integers(2, 64), n=st.integers(1, 8),
       seed=st.integers(0, 2**32))
def test_random_windows_property(tok, n_tokens, seq_len, n, seed):
    if n_tokens < seq_len + 1:
        with pytest.raises(UserError):
            token_windows(tok, words(n_tokens), n_samples=n, seq_len=seq_len, seed=seed,
                          mode="random", key="calib")
        return
    w = token_windows(tok, words(n_tokens), n_samples=n, seq_len=seq_len, seed=seed,
                      mode="random", key="calib")
    assert w.shape == (n, seq_len)
    assert torch.equal(w, w[:, :1] + torch.arange(seq_len))
    assert int(w.max()) < n_tokens


def test_sequential_windows_are_consecutive(tok):
    text = words(100)
    w = token_windows(tok, text, n_samples=3, seq_len=10, seed=0, mode="sequential", key="eval")
    assert torch.equal(w.reshape(-1), torch.arange(30))
    every = token_windows(tok, text, n_samples=None, seq_len=10, seed=0, mode="sequential",
                          key="eval")
    assert torch.equal(every.reshape(-1), torch.arange(100))
    some = token_windows(tok, words(105), n_samples=None, seq_len=10, seed=0,
                         mode="sequential", key="eval")
    assert some.shape == (10, 10)
    # The seed does not matter for sequential windows.
    assert torch.equal(w, token_windows(tok, text, n_samples=3, seq_len=10, seed=9,
                                        mode="sequential", key="eval"))


def test_no_length_warning_for_long_text(tok, capfd):
    token_windows(tok, words(200), n_samples=2, seq_len=32, seed=0, mode="random", key="calib")
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_text_shorter_than_seq_len(tok):
    with pytest.raises(UserError, match=r"^calib\.seq_len=512 is longer than calib\.path allows: "
                                        r"tiny\.txt has 300 tokens$"):
        token_windows(tok, words(300), n_samples=4, seq_len=512, seed=0, mode="random",
                      key="calib.path", source="tiny.txt")
    with pytest.raises(UserError, match=r"^eval\.seq_len=300 is longer than eval\.path allows: "
                                        r"the text has 300 tokens$"):
        token_windows(tok, words(300), n_samples=None, seq_len=300, seed=0, mode="sequential",
                      key="eval")


def test_too_many_sequential_windows(tok):
    with pytest.raises(UserError, match=r"^eval\.n_samples=11 is more than eval\.path holds: "
                                        r"e\.txt has 105 tokens, 10 windows of eval\.seq_len=10 fit$"):
        token_windows(tok, words(105), n_samples=11, seq_len=10, seed=0, mode="sequential",
                      key="eval", source="e.txt")


@pytest.mark.parametrize("n_samples", [0, -3])
def test_bad_n_samples(tok, n_samples):
    with pytest.raises(UserError, match=rf"^calib\.n_samples={n_samples} must be an integer >= 1$"):
        token_windows(tok, words(50), n_samples=n_samples, seq_len=8, seed=0, mode="random",
                      key="calib")


@pytest.mark.parametrize("seq_len", [1, 0, -5])
def test_bad_seq_len(tok, seq_len):
    with pytest.raises(UserError, match=rf"^eval\.seq_len={seq_len} must be an integer >= 2$"):
        token_windows(tok, words(50), n_samples=None, seq_len=seq_len, seed=0,
                      mode="sequential", key="eval.path")


def test_random_needs_n_samples(tok):
    with pytest.raises(UserError, match=r"^calib\.n_samples must be set"):
        token_windows(tok, words(50), n_samples=None, seq_len=8, seed=0, mode="random",
                      key="calib")


def test_unknown_mode_is_a_programming_error(tok):
    with pytest.raises(ValueError, match="mode"):
        token_windows(tok, words(50), n_samples=1, seq_len=8, seed=0, mode="shuffle", key="calib")


def test_load_then_windows_end_to_end(tmp_path, tok):
    (tmp_path / "a.txt").write_text(words(50), encoding="utf-8")
    (tmp_path / "b.txt").write_text(words(50, start=50), encoding="utf-8")
    text = load_text(str(tmp_path), key="eval.path")
    w = token_windows(tok, text, n_samples=None, seq_len=25, seed=0, mode="sequential",
                      key="eval", source=str(tmp_path))
    assert torch.equal(w.reshape(-1), torch.arange(100))
