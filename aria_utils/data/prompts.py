"""The condition corpus: reading prompts from txt / csv / tsv / json / jsonl / parquet or a hub dataset.

Reading is cheap and happens before any model is loaded, so a wrong path or column fails in seconds.

Corpora reach 1-10M prompts and every training process holds one, so prompts are kept packed
(`TextTable`: one UTF-8 buffer and an offset array, about the size of the text itself instead of
~60 bytes of Python object per string), files are streamed and only the needed columns are read,
and duplicates are found by 64-bit hashes (checked against the text) instead of a set of strings.
"""

import array
import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from aria_utils.cli import UserInputError

logger = logging.getLogger(__name__)

PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet")
# Rows are read and packed in chunks of this many: bounded Python objects whatever the corpus size.
READ_CHUNK = 65_536
# UTF-8, and a byte-order mark (as spreadsheet programs write) is dropped instead of starting the first
# prompt or hiding the header's first column name.
TEXT_ENCODING = "utf-8-sig"
# CLIP reads 77 tokens (about 300 characters of English); far longer prompts are cut without a word.
LONG_PROMPT_CHARACTERS = 1000


class PromptCorpusError(UserInputError):
    """Bad corpus input; the message names the flag and the fix."""


def text_hash(text):
    """A stable 64-bit hash of a string (the same in every process and run, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class TextTable:
    """An immutable sequence of strings packed into one UTF-8 buffer plus offsets.

    Behaves like a read-only list of str (len, indexing, slicing, iteration). `find` looks strings up
    by hash with a sorted array, so no dict of every string is ever built.
    """

    def __init__(self, data, offsets, hashes=None):
        self._data = np.asarray(data, dtype=np.uint8)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._hashes = None if hashes is None else np.asarray(hashes, dtype=np.uint64)  # text_hash of each string
        self._sorted_hashes = self._hash_order = None
        self._digest = None

    @classmethod
    def from_strings(cls, strings):
        data, offsets = bytearray(), array.array("q", [0])
        for text in strings:
            data += text.encode("utf-8")
            offsets.append(len(data))
        # frombuffer shares the memory of the bytearray / array (no copy of the text).
        return cls(np.frombuffer(data, dtype=np.uint8), np.frombuffer(offsets, dtype=np.int64))

    def __len__(self):
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        return self._data[self._offsets[index]: self._offsets[index + 1]].tobytes().decode("utf-8")

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def __eq__(self, other):
        if isinstance(other, TextTable):
            return np.array_equal(self._offsets, other._offsets) and np.array_equal(self._data, other._data)
        return NotImplemented

    def take(self, indices):
        return [self[i] for i in np.asarray(indices).tolist()]

    def select(self, indices):
        """A new table holding the strings at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self._offsets[indices + 1] - self._offsets[indices]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        hashes = None if self._hashes is None else self._hashes[indices]
        if len(indices) == 0:
            return TextTable(np.zeros(0, np.uint8), offsets, hashes)
        # Byte positions of every selected string, gathered in one vectorised step.
        starts = np.repeat(self._offsets[indices] - offsets[:-1], lengths)
        return TextTable(self._data[starts + np.arange(offsets[-1])], offsets, hashes)

    @property
    def nbytes(self):
        return self._data.nbytes + self._offsets.nbytes

    def hashes(self):
        if self._hashes is None:
            self._hashes = np.fromiter((text_hash(text) for text in self), dtype=np.uint64, count=len(self))
        return self._hashes

    def find(self, texts):
        """Position of each of `texts` in this table (its first occurrence), or -1."""
        if self._sorted_hashes is None:
            hashes = self.hashes()
            self._hash_order = np.argsort(hashes, kind="stable")
            self._sorted_hashes = hashes[self._hash_order]
        positions = np.full(len(texts), -1, dtype=np.int64)
        for slot, text in enumerate(texts):
            value = np.uint64(text_hash(text))
            start = np.searchsorted(self._sorted_hashes, value, side="left")
            stop = np.searchsorted(self._sorted_hashes, value, side="right")
            for candidate in self._hash_order[start:stop]:  # almost always one; more only on a hash collision
                if self[candidate] == text:
                    positions[slot] = candidate
                    break
        return positions

    def digest(self, chunk=1 << 20):
        """sha256 of the strings in order, each followed by a newline: one pass over the packed buffer, `chunk`
        strings at a time (a copy of the whole text with the newlines would double a 10M-prompt corpus's memory).
        Computed once: the table never changes, and the run records it and the region index keys on it."""
        if self._digest is None:
            self._digest = self._compute_digest(chunk)
        return self._digest

    def _compute_digest(self, chunk):
        digest = hashlib.sha256()
        for start in range(0, len(self), chunk):
            offsets = self._offsets[start: min(len(self), start + chunk) + 1]
            text = self._data[offsets[0]: offsets[-1]]
            digest.update(np.insert(text, offsets[1:] - offsets[0], np.uint8(10)).tobytes())
        return digest.hexdigest()


@dataclass
class PromptCorpus:
    prompts: TextTable
    categories: np.ndarray = None  # same length as prompts (object array of str), or None without a category column
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


def _resolve_column(columns, requested, flag, source):
    """Exact match first, then a unique case-insensitive match (PartiPrompts says 'Prompt')."""
    if requested in columns:
        return requested
    folded = [column for column in columns if column.lower() == requested.lower()]
    if len(folded) == 1:
        return folded[0]
    raise PromptCorpusError(f"{flag} {requested!r} is not a column of {source}; available columns: {list(columns)}.")


class _Columns:
    """Resolves the prompt / category columns of a table once its header is known."""

    def __init__(self, prompt_column, category_column, source):
        self.prompt_column, self.category_column, self.source = prompt_column, category_column, source

    def resolve(self, columns):
        if not columns:
            raise PromptCorpusError(f"--prompt_file {self.source!r} is empty: it has no header row or records.")
        prompt = _resolve_column(columns, self.prompt_column, "--prompt_column", self.source)
        category = None
        if self.category_column is not None:
            category = _resolve_column(columns, self.category_column, "--category_column", self.source)
        return prompt, category


def _read_records(path, columns):
    """Yield (prompt, category or None) pairs from a file, streaming where the format allows."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        if columns.category_column is not None:
            raise PromptCorpusError(f"--category_column needs a table (csv/tsv/json/jsonl/parquet); {path!r} is "
                                    "plain text with one prompt per line.")
        with open(path, encoding=TEXT_ENCODING) as handle:
            for line in handle:
                yield line.rstrip("\n"), None
        return
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding=TEXT_ENCODING) as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            prompt, category = columns.resolve(reader.fieldnames or [])
            for row in reader:
                yield row[prompt], row[category] if category else None
        return
    if suffix == ".jsonl":
        with open(path, encoding=TEXT_ENCODING) as handle:
            resolved = None
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                row = _json_record(line, path, line_number)
                if resolved is None:
                    resolved = columns.resolve(list(row.keys()))
                yield row.get(resolved[0]), row.get(resolved[1]) if resolved[1] else None
            if resolved is None:
                columns.resolve([])
        return
    if suffix == ".json":
        with open(path, encoding=TEXT_ENCODING) as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise PromptCorpusError(f"--prompt_file {path!r} is not valid JSON ({error}).") from None
        if isinstance(data, dict):  # {"prompt": [...], "category": [...]}
            prompt, category = columns.resolve(list(data.keys()))
            categories = data[category] if category else [None] * len(data[prompt])
            yield from zip(data[prompt], categories)
            return
        if data and isinstance(data[0], str):
            if columns.category_column is not None:
                raise PromptCorpusError(f"--category_column needs records; {path!r} is a JSON list of strings.")
            for text in data:
                yield text, None
            return
        prompt, category = columns.resolve(list(data[0].keys()) if data else [])
        for row in data:
            yield row.get(prompt), row.get(category) if category else None
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        prompt, category = columns.resolve(parquet.schema_arrow.names)
        wanted = [prompt] + ([category] if category else [])
        for batch in parquet.iter_batches(columns=wanted, batch_size=READ_CHUNK):  # only these columns are read
            prompts = batch.column(prompt).to_pylist()
            categories = batch.column(category).to_pylist() if category else [None] * len(prompts)
            yield from zip(prompts, categories)
        return
    raise PromptCorpusError(
        f"--prompt_file {path!r} has an unsupported extension; use one of {', '.join(PROMPT_FILE_SUFFIXES)}."
    )


def _json_record(line, path, line_number):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise PromptCorpusError(f"--prompt_file {path!r} line {line_number} is not JSON ({error}).") from None
    if not isinstance(row, dict):
        raise PromptCorpusError(f"--prompt_file {path!r} line {line_number} is not a JSON object.")
    return row


def _read_hub_records(name, split, columns):
    import datasets

    dataset = datasets.load_dataset(name, split=split)  # memory-mapped Arrow: only the read columns come in
    prompt, category = columns.resolve(dataset.column_names)
    wanted = [prompt] + ([category] if category else [])
    for batch in dataset.select_columns(wanted).iter(batch_size=READ_CHUNK):
        categories = batch[category] if category else [None] * len(batch[prompt])
        yield from zip(batch[prompt], categories)


def _not_a_regular_file(path, flag):
    """A message for a path that exists in name only or is no regular file (opening a FIFO would block)."""
    import stat

    if os.path.islink(path) and not os.path.exists(path):
        return (f"{flag} {path!r} is a symbolic link that leads nowhere (a loop or a missing target); pass the "
                "prompt file itself.")
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return f"{flag} {path!r} cannot be read ({os.strerror(error.errno).lower()})."
    if stat.S_ISDIR(mode):
        return (f"{flag} {path!r} is a folder; pass one txt/csv/tsv/json/jsonl/parquet file"
                + (" (or --prompt_dataset_name for a hub dataset)." if flag == "--prompt_file" else "."))
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return f"{flag} {path!r} is {kind}, not a regular file; write the prompts to a file and pass that."
    return None


def check_prompt_file(prompt_file, flag="--prompt_file"):
    """Fail in milliseconds on a prompt file that cannot be read: missing, a folder, a FIFO, a wrong suffix, binary."""
    if not os.path.lexists(prompt_file):
        raise PromptCorpusError(f"{flag} {prompt_file!r} does not exist; pass a txt/csv/tsv/json/jsonl/parquet file.")
    problem = _not_a_regular_file(prompt_file, flag)
    if problem:
        raise PromptCorpusError(problem)
    suffix = os.path.splitext(prompt_file)[1].lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise PromptCorpusError(f"{flag} {prompt_file!r} has an unsupported extension; use one of "
                                f"{', '.join(PROMPT_FILE_SUFFIXES)}.")
    with open(prompt_file, "rb") as handle:
        head = handle.read(8192)
    if not head.strip() and os.path.getsize(prompt_file) <= len(head):
        raise PromptCorpusError(f"{flag} {prompt_file!r} holds no non-empty prompt (the file is blank); the "
                                "condition corpus needs at least one.")
    if suffix != ".parquet" and b"\x00" in head:
        raise PromptCorpusError(f"{flag} {prompt_file!r} is a binary file, not text; pass a "
                                "txt/csv/tsv/json/jsonl (UTF-8) or parquet file.")


def load_prompt_corpus(prompt_file=None, prompt_dataset_name=None, prompt_column="prompt",
                       category_column=None, split="train"):
    """Read, clean (strip, drop empty, drop duplicates keeping the first) and return a PromptCorpus."""
    if (prompt_file is None) == (prompt_dataset_name is None):
        raise PromptCorpusError("Give exactly one of --prompt_file or --prompt_dataset_name for the condition corpus.")
    if prompt_file is not None:
        check_prompt_file(prompt_file)
        source = prompt_file
        records = _read_records(prompt_file, _Columns(prompt_column, category_column, prompt_file))
    else:
        source = prompt_dataset_name
        records = _read_hub_records(prompt_dataset_name, split, _Columns(prompt_column, category_column,
                                                                          prompt_dataset_name))

    data, offsets, hashes = bytearray(), array.array("q", [0]), array.array("Q")
    category_names, category_codes = {}, array.array("i")
    num_empty = num_long = longest = 0
    flag = "--prompt_file" if prompt_file is not None else "--prompt_dataset_name"
    try:
        for record_number, (prompt, category) in enumerate(records, 1):
            if prompt is not None and not isinstance(prompt, str):
                raise PromptCorpusError(
                    f"{flag} {source!r}: --prompt_column {prompt_column!r} holds {type(prompt).__name__} values "
                    f"(record {record_number}: {prompt!r}), not text; pass the column that holds the prompts.")
            prompt = "" if prompt is None else prompt.strip()
            if not prompt:
                num_empty += 1
                continue
            if "\x00" in prompt:
                raise PromptCorpusError(
                    f"{flag} {source!r}: record {record_number} holds a NUL byte, so the file is binary or damaged "
                    "(a prompt never contains one); repair or regenerate the file.")
            if len(prompt) > LONG_PROMPT_CHARACTERS:
                num_long, longest = num_long + 1, max(longest, len(prompt))
            encoded = prompt.encode("utf-8")
            data += encoded
            offsets.append(len(data))
            hashes.append(int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little"))
            if category_column is not None:
                category_codes.append(category_names.setdefault(str(category), len(category_names)))
    except csv.Error as error:
        raise PromptCorpusError(f"{flag} {source!r} cannot be read as a table ({error}); repair the file or save it "
                                "again as UTF-8 csv/tsv.") from None
    except UnicodeDecodeError as error:
        raise PromptCorpusError(
            f"--prompt_file {prompt_file!r} is not UTF-8 text (byte {error.start}: {error.reason}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {prompt_file} > prompts-utf8{os.path.splitext(prompt_file)[1]}`.") from None
    raw = TextTable(np.frombuffer(data, dtype=np.uint8), np.frombuffer(offsets, dtype=np.int64),
                    np.frombuffer(hashes, dtype=np.uint64))
    keep = _first_occurrences(raw, raw.hashes())
    if len(keep) == 0:
        raise PromptCorpusError(f"{flag} {source!r} holds no non-empty prompt; the condition corpus needs at least one.")
    categories = None
    if category_column is not None:
        names = np.empty(len(category_names), dtype=object)
        for name, code in category_names.items():
            names[code] = name
        categories = names[np.frombuffer(category_codes, dtype=np.int32)[keep]]
    corpus = PromptCorpus(
        prompts=raw.select(keep) if len(keep) < len(raw) else raw,
        categories=categories,
        num_empty_dropped=num_empty,
        num_duplicates_dropped=len(raw) - len(keep),
        source=source,
    )
    if num_empty or len(keep) < len(raw):
        logger.warning("Condition corpus: %s", corpus.summary())
    if num_long:
        logger.warning("Condition corpus: %d prompts are longer than %d characters (the longest %d); the text encoder "
                       "reads only the first tokens of each (77 for CLIP, about 300 characters), the rest is cut.",
                       num_long, LONG_PROMPT_CHARACTERS, longest)
    return corpus


def _first_occurrences(table, hashes):
    """Sorted positions of the first occurrence of every distinct string (hash groups checked by text)."""
    if len(hashes) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(hashes, kind="stable")  # equal hashes stay in file order
    sorted_hashes = hashes[order]
    starts_group = np.concatenate([[True], sorted_hashes[1:] != sorted_hashes[:-1]])
    keep = order[starts_group]
    # A repeated hash is nearly always a repeated prompt; keep the rare true collisions.
    group_first = np.maximum.accumulate(np.where(starts_group, np.arange(len(order)), 0))
    extra = [order[position] for position in np.flatnonzero(~starts_group)
             if table[order[position]] != table[order[group_first[position]]]
             and all(table[order[position]] != table[order[other]] for other in range(group_first[position], position))]
    return np.sort(np.concatenate([keep, np.asarray(extra, dtype=np.int64)]))
