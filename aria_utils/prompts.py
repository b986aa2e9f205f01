"""The condition corpus: reading prompts from txt / csv / tsv / json / jsonl / parquet or a hub dataset.

Reading is cheap and happens before any model is loaded, so a wrong path or column fails in seconds.
"""

import csv
import json
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet")


class PromptCorpusError(ValueError):
    """Bad corpus input; the message names the flag and the fix."""


@dataclass
class PromptCorpus:
    prompts: list
    categories: list = None  # same length as prompts, or None when the source has no category column
    num_empty_dropped: int = 0
    num_duplicates_dropped: int = 0
    source: str = ""

    def __len__(self):
        return len(self.prompts)

    def summary(self):
        return (
            f"{len(self.prompts)} distinct prompts from {self.source} "
            f"({self.num_empty_dropped} empty and {self.num_duplicates_dropped} duplicate entries dropped)"
        )


def _resolve_column(columns, requested, flag):
    """Exact match first, then a unique case-insensitive match (PartiPrompts says 'Prompt')."""
    if requested in columns:
        return requested
    folded = [column for column in columns if column.lower() == requested.lower()]
    if len(folded) == 1:
        return folded[0]
    raise PromptCorpusError(f"{flag} {requested!r} is not a column of the data; available columns: {list(columns)}.")


def _read_rows(path):
    """Return (columns, rows as dicts) for a table file, or (None, lines) for a .txt file."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as handle:
            return None, [line.rstrip("\n") for line in handle]
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        return (list(rows[0].keys()) if rows else []), rows
    if suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if isinstance(data, dict):  # {"prompt": [...], "category": [...]}
            columns = list(data.keys())
            length = len(next(iter(data.values()))) if data else 0
            return columns, [{column: data[column][i] for column in columns} for i in range(length)]
        if data and isinstance(data[0], str):
            return None, data
        return (list(data[0].keys()) if data else []), data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.column_names, table.to_pylist()
    raise PromptCorpusError(
        f"--prompt_file {path!r} has an unsupported extension; use one of {', '.join(PROMPT_FILE_SUFFIXES)}."
    )


def _read_hub_dataset(name, split):
    import datasets

    dataset = datasets.load_dataset(name, split=split)
    return dataset.column_names, dataset


def load_prompt_corpus(prompt_file=None, prompt_dataset_name=None, prompt_column="prompt",
                       category_column=None, split="train"):
    """Read, clean (strip, drop empty, drop duplicates keeping the first) and return a PromptCorpus."""
    if (prompt_file is None) == (prompt_dataset_name is None):
        raise PromptCorpusError("Give exactly one of --prompt_file or --prompt_dataset_name for the condition corpus.")
    if prompt_file is not None:
        if not os.path.isfile(prompt_file):
            raise PromptCorpusError(f"--prompt_file {prompt_file!r} does not exist; pass a txt/csv/tsv/json/parquet file.")
        columns, rows = _read_rows(prompt_file)
        source = prompt_file
    else:
        columns, rows = _read_hub_dataset(prompt_dataset_name, split)
        source = prompt_dataset_name

    if columns is None:  # plain list of prompts
        raw_prompts, raw_categories = [str(line) for line in rows], None
    else:
        column = _resolve_column(columns, prompt_column, "--prompt_column")
        raw_prompts = [row[column] for row in rows]
        raw_categories = None
        if category_column is not None:
            category = _resolve_column(columns, category_column, "--category_column")
            raw_categories = [str(row[category]) for row in rows]

    prompts, categories, seen = [], [], set()
    num_empty = num_duplicates = 0
    for index, prompt in enumerate(raw_prompts):
        prompt = "" if prompt is None else str(prompt).strip()
        if not prompt:
            num_empty += 1
            continue
        if prompt in seen:
            num_duplicates += 1
            continue
        seen.add(prompt)
        prompts.append(prompt)
        if raw_categories is not None:
            categories.append(raw_categories[index])
    if not prompts:
        flag = "--prompt_file" if prompt_file is not None else "--prompt_dataset_name"
        raise PromptCorpusError(f"{flag} {source!r} holds no non-empty prompt; the condition corpus needs at least one.")
    corpus = PromptCorpus(
        prompts=prompts,
        categories=categories if raw_categories is not None else None,
        num_empty_dropped=num_empty,
        num_duplicates_dropped=num_duplicates,
        source=source,
    )
    if num_empty or num_duplicates:
        logger.warning("Condition corpus: %s", corpus.summary())
    return corpus
