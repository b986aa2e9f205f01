import json

import pytest

from aria_utils.data.prompts import PromptCorpusError, load_prompt_corpus

ROWS = [("a cat", "animals"), ("a red car", "vehicles"), ("", "empty"), ("a cat", "animals"), ("  a boat ", "vehicles")]


def write(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(p for p, _ in ROWS) + "\n")
    elif suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        path.write_text(f"prompt{sep}category\n" + "\n".join(f'"{p}"{sep}{c}' for p, c in ROWS) + "\n")
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"prompt": p, "category": c}) for p, c in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps([{"prompt": p, "category": c} for p, c in ROWS]))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": [p for p, _ in ROWS], "category": [c for _, c in ROWS]}), path)
    return str(path)


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_formats_clean_empty_and_duplicate_prompts(tmp_path, suffix):
    corpus = load_prompt_corpus(prompt_file=write(tmp_path, suffix))
    assert list(corpus.prompts) == ["a cat", "a red car", "a boat"]
    assert corpus.num_empty_dropped == 1 and corpus.num_duplicates_dropped == 1
    assert "1 empty and 1 duplicate" in corpus.summary()


def test_categories_follow_their_prompts(tmp_path):
    corpus = load_prompt_corpus(prompt_file=write(tmp_path, ".csv"), category_column="category")
    assert list(corpus.categories) == ["animals", "vehicles", "vehicles"]


def test_case_insensitive_column_like_partiprompts(tmp_path):
    path = tmp_path / "parti.tsv"
    path.write_text("Prompt\tCategory\nbond\tAbstract\n")
    assert list(load_prompt_corpus(prompt_file=str(path)).prompts) == ["bond"]


def test_missing_column_lists_available(tmp_path):
    with pytest.raises(PromptCorpusError, match="--prompt_column 'caption'.*'prompt', 'category'"):
        load_prompt_corpus(prompt_file=write(tmp_path, ".csv"), prompt_column="caption")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PromptCorpusError, match="--prompt_file .* does not exist"):
        load_prompt_corpus(prompt_file=str(tmp_path / "nope.csv"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PromptCorpusError, match="no non-empty prompt"):
        load_prompt_corpus(prompt_file=str(empty))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "prompts.xlsx"
    path.write_text("x")
    with pytest.raises(PromptCorpusError, match="unsupported extension"):
        load_prompt_corpus(prompt_file=str(path))


def test_a_byte_order_mark_is_dropped(tmp_path):
    text = tmp_path / "bom.txt"
    text.write_bytes("\ufeffa cat\na dog\n".encode("utf-8"))
    assert list(load_prompt_corpus(prompt_file=str(text)).prompts) == ["a cat", "a dog"]
    table = tmp_path / "bom.csv"  # as spreadsheet programs save UTF-8 csv: the header's first name keeps it otherwise
    table.write_bytes("\ufeffprompt,category\na cat,animals\n".encode("utf-8"))
    assert list(load_prompt_corpus(prompt_file=str(table)).prompts) == ["a cat"]


def test_prompts_that_are_not_text_are_refused(tmp_path):
    records = tmp_path / "ids.jsonl"
    records.write_text('{"prompt": "a cat"}\n{"prompt": 17}\n')
    with pytest.raises(PromptCorpusError, match=r"--prompt_column 'prompt' holds int values \(record 2: 17\)"):
        load_prompt_corpus(prompt_file=str(records))


def test_very_long_prompts_are_reported(tmp_path, caplog):
    path = tmp_path / "long.txt"
    path.write_text("a cat\n" + "word " * 20_000 + "\n")
    with caplog.at_level("WARNING", logger="aria_utils.data.prompts"):
        corpus = load_prompt_corpus(prompt_file=str(path))
    assert len(corpus) == 2
    assert "1 prompts are longer than 1000 characters (the longest 99999)" in caplog.text
    assert "77 for CLIP" in caplog.text


def test_corpus_digest_is_the_same_in_chunks():
    """The digest names a corpus in region caches, manifests and checkpoints: reading it in bounded chunks must
    give the sha256 of the whole text, one newline after each prompt."""
    import hashlib

    from aria_utils.data.prompts import TextTable

    prompts = ["a cat", "", "ünïcode é", "a dog"] * 50
    table = TextTable.from_strings(prompts)
    expected = hashlib.sha256("".join(prompt + "\n" for prompt in prompts).encode("utf-8")).hexdigest()
    assert table.digest() == expected and table.digest(chunk=3) == expected
