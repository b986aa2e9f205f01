"""Paired (latent, caption) data: teacher-generated latents, or real images encoded once by the VAE.

On disk a paired set is a folder of shards (written by `generate_teacher_data` and by the image
encoder below):

    manifest.json                 how the set was made, its shards and counts; "complete" once all exist,
                                  and then each shard's file sizes and sha256 checksums
    shards/shard-00000.jsonl      one caption row per latent ({"index", "caption", ...}; for SDXL also
                                  "micro_conditioning": [original h, w, crop top, left, target h, w])
    shards/shard-00000.check.json the sizes and sha256 of the two files, recorded when they were written
    shards/shard-00000.safetensors  "latents": (n, C, h, w) float16, already times the VAE scaling factor

A shard's `.safetensors` file is written last and atomically, so its presence marks the shard as
finished. `verify_shard` compares a shard with what was recorded at write time (sizes, checksums, and
that every latent is finite and not all zeros), so a copy cut short or a file zeroed by a failing disk
is found and redone by `generate_teacher_data`. The single-file layout of earlier versions
(`latents.safetensors` + `metadata.jsonl`) is still read.

Training never loads the latents into memory: `PairedLatents` reads only the rows of the requested
batch, with positioned reads (no memory map, so a file truncated while training runs is an error
naming the shard, not a SIGBUS), and converts them to float32; RAM per process does not grow with the
number of latents and the processes of one machine share the page cache. Captions are held packed
(`TextTable`).
"""

import array
import hashlib
import json
import logging
import os

import numpy as np
import torch

from aria_utils.cli import UserInputError
from aria_utils.files import apply_umask, read_safetensors_header, write_bytes_atomically, write_json_atomically
from aria_utils.data.prompts import TextTable
from aria_utils.families.base import latents_from_vae

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
CHECK_SUFFIX = ".check.json"
REPAIR_HINT = ("re-run the generate_teacher_data command that made it: it verifies every shard against the "
               "manifest and redoes damaged ones")
FORMAT_NAME = "aria-distill-paired-latents"
FORMAT_VERSION = 1
# The single-file layout of earlier versions.
LATENTS_FILE = "latents.safetensors"
METADATA_FILE = "metadata.jsonl"

_SAFETENSORS_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64}


class PairedDataError(UserInputError):
    """Bad paired-data input; the message names the flag, the file and the fix."""


def is_teacher_latent_dir(path):
    return path is not None and (os.path.isfile(os.path.join(path, MANIFEST_FILE))
                                 or os.path.isfile(os.path.join(path, LATENTS_FILE)))


# ----------------------------------------------------------------------------------------------- writing
def shard_files(directory, shard_index):
    """(latents path, captions path) of shard `shard_index`."""
    stem = os.path.join(directory, SHARDS_DIR, f"shard-{shard_index:05d}")
    return stem + ".safetensors", stem + ".jsonl"


def plan_shards(num_latents, shard_size):
    """Shard i holds latents [i * shard_size, min(N, (i + 1) * shard_size))."""
    return [{"latents": f"{SHARDS_DIR}/shard-{i:05d}.safetensors", "captions": f"{SHARDS_DIR}/shard-{i:05d}.jsonl",
             "num_latents": min(shard_size, num_latents - start)}
            for i, start in enumerate(range(0, num_latents, shard_size))]


def new_manifest(num_latents, shard_size, latent_shape, settings):
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "complete": False, "num_latents": int(num_latents),
            "shard_size": int(shard_size), "latent_shape": [int(x) for x in latent_shape], "dtype": "float16",
            "settings": settings, "shards": plan_shards(num_latents, shard_size)}


def read_manifest(directory):
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PairedDataError(f"{path} is not valid JSON ({error}); the paired set is damaged: regenerate it into a "
                              "new folder.") from None
    if manifest.get("format") != FORMAT_NAME:
        raise PairedDataError(f"{path} is not a paired-latent manifest (format {manifest.get('format')!r}).")
    return manifest


def write_manifest(directory, manifest):
    write_json_atomically(os.path.join(directory, MANIFEST_FILE), manifest)


def check_file(directory, shard_index):
    return os.path.join(directory, SHARDS_DIR, f"shard-{shard_index:05d}{CHECK_SUFFIX}")


def bad_latent_row(latents):
    """(row, reason) of the first latent that is not finite or is all zeros (a teacher latent never is), else None."""
    flat = latents.reshape(len(latents), -1)
    finite = torch.isfinite(flat).all(dim=1)
    if not finite.all():
        return int(torch.nonzero(~finite)[0]), "is not finite (NaN or inf)"
    zero = (flat == 0).all(dim=1)
    if zero.any():
        return int(torch.nonzero(zero)[0]), "is all zeros (the file was zeroed or damaged)"
    return None


def write_shard(directory, shard_index, latents, rows):
    """Captions, then their checksums, then the latents: the latents file appears last, atomically, marking
    the shard done. Returns the shard's check record (file sizes and sha256)."""
    from safetensors.torch import save as safetensors_bytes

    latents_path, captions_path = shard_files(directory, shard_index)
    os.makedirs(os.path.dirname(latents_path), exist_ok=True)
    apply_umask(os.path.dirname(latents_path))
    if len(rows) != len(latents):
        raise ValueError(f"shard {shard_index}: {len(latents)} latents but {len(rows)} caption rows")
    bad = bad_latent_row(latents.float())
    if bad:
        raise PairedDataError(f"The teacher's latent for {rows[bad[0]]['caption']!r} (latent {rows[bad[0]]['index']}) "
                              f"{bad[1]}; under --mixed_precision fp16 the teacher can overflow: generate with bf16 "
                              "or no.")
    captions = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
    latents_bytes = safetensors_bytes({"latents": latents.to(torch.float16).contiguous()})
    record = {"num_latents": len(rows), "captions_bytes": len(captions),
              "captions_sha256": hashlib.sha256(captions).hexdigest(), "latents_bytes": len(latents_bytes),
              "latents_sha256": hashlib.sha256(latents_bytes).hexdigest()}
    write_bytes_atomically(captions_path, captions)
    write_json_atomically(check_file(directory, shard_index), record)
    write_bytes_atomically(latents_path, latents_bytes)
    return record


def shard_record(directory, manifest, shard_index, prefer_check_file=False):
    """What was recorded when shard `shard_index` was written: the manifest's copy or the shard's check file
    (the manifest's first: the check file sits next to the data it vouches for), else None."""
    shard = manifest["shards"][shard_index]
    from_check_file = None
    try:
        with open(check_file(directory, shard_index), encoding="utf-8") as handle:
            from_check_file = json.load(handle)
    except (OSError, ValueError):
        pass
    if "latents_sha256" in shard and not (prefer_check_file and from_check_file):
        return shard
    return from_check_file


CHECK_KEYS = ("captions_bytes", "captions_sha256", "latents_bytes", "latents_sha256")


def shard_check_of_files(directory, shard_index):
    """The check record of a shard's files as they are now."""
    latents_path, captions_path = shard_files(directory, shard_index)
    return {"captions_bytes": os.path.getsize(captions_path), "captions_sha256": _file_sha256(captions_path),
            "latents_bytes": os.path.getsize(latents_path), "latents_sha256": _file_sha256(latents_path)}


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shard(directory, manifest, shard_index, read_data=True):
    """None when shard `shard_index` is what was written, else what is wrong with it.

    With `read_data` the whole shard is read (checksums, every latent finite and not all zeros); without,
    only the file sizes and the header are compared with the record (a stat and a header read)."""
    shard = manifest["shards"][shard_index]
    latents_path = os.path.join(directory, shard["latents"])
    captions_path = os.path.join(directory, shard["captions"])
    for path in (latents_path, captions_path):
        if not os.path.isfile(path):
            return f"{os.path.relpath(path, directory)} is missing"
    record = shard_record(directory, manifest, shard_index)
    if record is not None:
        for path, size_key, digest_key in ((latents_path, "latents_bytes", "latents_sha256"),
                                           (captions_path, "captions_bytes", "captions_sha256")):
            name = os.path.relpath(path, directory)
            if os.path.getsize(path) != record[size_key]:
                return f"{name} has {os.path.getsize(path)} bytes, {record[size_key]} were written"
            if read_data and _file_sha256(path) != record[digest_key]:
                return f"{name} does not match the checksum recorded when it was written (damaged)"
    try:
        offset, shape, dtype = tensor_location(latents_path, "latents")
    except PairedDataError as error:
        return str(error)
    if shape[0] != shard["num_latents"]:
        return f"{shard['latents']} holds {shape[0]} latents, the manifest plans {shard['num_latents']}"
    if not read_data:
        return None
    latents = PairedLatents([(latents_path, offset, shape[0], dtype)], None, shape[1:], directory)
    for start in range(0, shape[0], 256):
        bad = bad_latent_row(latents.read_rows(0, np.arange(start, min(shape[0], start + 256))))
        if bad:
            return f"latent {start + bad[0]} of {shard['latents']} {bad[1]}"
    return None


def finished_shards(directory, manifest):
    """Indices of the shards whose files are both present with the planned number of latents."""
    done = []
    for index, shard in enumerate(manifest["shards"]):
        latents_path = os.path.join(directory, shard["latents"])
        if not (os.path.isfile(latents_path) and os.path.isfile(os.path.join(directory, shard["captions"]))):
            continue
        try:
            location = tensor_location(latents_path, "latents")
        except PairedDataError:
            continue  # damaged: it is redone
        if location[1][0] == shard["num_latents"]:
            done.append(index)
    return done


def remove_partial_files(directory):
    """Leftovers of a process killed mid-write (`*.tmp`): never read, removed before a re-run writes."""
    shards = os.path.join(directory, SHARDS_DIR)
    for name in os.listdir(shards) if os.path.isdir(shards) else []:
        if name.endswith(".tmp"):
            os.remove(os.path.join(shards, name))


def save_paired_latents(output_dir, latents, captions, settings=None, extra_rows=None, shard_size=None):
    """Write a whole in-memory set in the sharded format (small sets and tests)."""
    num_latents = len(latents)
    shard_size = shard_size or max(1, num_latents)
    os.makedirs(output_dir, exist_ok=True)
    manifest = new_manifest(num_latents, shard_size, latents.shape[1:], settings or {})
    write_manifest(output_dir, manifest)
    for shard_index, start in enumerate(range(0, num_latents, shard_size)):
        stop = min(num_latents, start + shard_size)
        rows = [dict({"index": i, "caption": captions[i]}, **(extra_rows[i] if extra_rows else {}))
                for i in range(start, stop)]
        manifest["shards"][shard_index].update(write_shard(output_dir, shard_index, latents[start:stop], rows))
    manifest["complete"] = True
    write_manifest(output_dir, manifest)


# ----------------------------------------------------------------------------------------------- reading
def tensor_location(path, name):
    """(byte offset, shape, numpy dtype) of tensor `name` in a safetensors file, checked against its size:
    the rows can then be read in place instead of loading the tensor."""
    try:
        header, data_start, size = read_safetensors_header(path)
        entry = header[name]
        begin, end = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        shape = tuple(entry["shape"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise PairedDataError(f"{path} is not a readable safetensors file with a {name!r} tensor ({error}); it is "
                              "damaged or truncated: regenerate the paired set.") from None
    if dtype is None:
        raise PairedDataError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, expected F16 or F32.")
    offset = data_start + begin
    if offset + (end - begin) > size or (end - begin) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        fix = REPAIR_HINT if os.path.basename(os.path.dirname(path)) == SHARDS_DIR else "regenerate the paired set"
        raise PairedDataError(f"{path} is truncated ({size} bytes, its header promises {offset + end - begin}); "
                              f"{fix}.")
    return offset, shape, dtype


class PairedLatents:
    """A read-only paired set: `len`, `captions` (TextTable), `latent_shape`, and `latents(indices)`.

    Nothing is kept open: each batch opens the shards it touches and reads its rows with positioned
    reads, so the object pickles cheaply into DataLoader workers, no file handle count grows with the
    number of shards, and a shard that became shorter is an error naming it instead of a SIGBUS.
    """

    def __init__(self, files, captions, latent_shape, source, micro_conditioning=None):
        self.files = files  # [(path, byte offset, number of latents, numpy dtype)]
        self.captions = captions
        # SDXL time ids per latent: None (not stored), (1, 6) when every row has the same, else (n, 6) int32.
        self.micro_conditioning = micro_conditioning
        self.latent_shape = tuple(latent_shape)
        self.source = source
        self._starts = np.concatenate([[0], np.cumsum([count for _, _, count, _ in files])]).astype(np.int64)

    def __len__(self):
        return int(self._starts[-1])

    def read_rows(self, file_index, rows):
        """float32 (len(rows), C, h, w) of rows `rows` of file `file_index`; PairedDataError if it is cut short."""
        path, offset, count, dtype = self.files[file_index]
        row_bytes = int(np.prod(self.latent_shape)) * np.dtype(dtype).itemsize
        out = np.empty((len(rows), *self.latent_shape), dtype=np.float32)
        try:
            with open(path, "rb", buffering=0) as handle:
                for slot, row in enumerate(np.asarray(rows).tolist()):
                    data = os.pread(handle.fileno(), row_bytes, offset + row * row_bytes)
                    if len(data) != row_bytes:
                        raise PairedDataError(
                            f"{path} became shorter than its header says (latent {row} cannot be read): the file was "
                            f"truncated or replaced while training ran; {REPAIR_HINT}, then resume.")
                    out[slot] = np.frombuffer(data, dtype=dtype).reshape(self.latent_shape)
        except FileNotFoundError:
            raise PairedDataError(f"{path} disappeared while training ran; restore the paired set, then resume.") from None
        return torch.from_numpy(out)

    def latents(self, indices):
        """float32 tensor (len(indices), C, h, w): only these rows are read from disk.

        Raises PairedDataError naming the shard and the latent when a row is cut short, not finite, or
        all zeros, so damaged data stops training with the way to repair it instead of training on it.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"latent index out of range for {len(self)} latents")
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        out = torch.empty((len(indices), *self.latent_shape), dtype=torch.float32)
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            local = indices[rows] - self._starts[shard]
            values = self.read_rows(int(shard), local)
            bad = bad_latent_row(values)
            if bad:
                raise PairedDataError(
                    f"--train_data_dir {self.source!r}: latent {int(local[bad[0]])} of "
                    f"{os.path.relpath(self.files[shard][0], self.source)} {bad[1]}; {REPAIR_HINT}, then resume.")
            out[torch.from_numpy(rows)] = values
        return out

    def time_ids(self, indices):
        """float32 (len(indices), 6) SDXL micro-conditioning of these latents, or None when the set has none."""
        if self.micro_conditioning is None:
            return None
        rows = np.zeros(len(indices), dtype=np.int64) if len(self.micro_conditioning) == 1 else np.asarray(indices)
        return torch.from_numpy(self.micro_conditioning[rows].astype(np.float32))

    def truncated(self, max_samples):
        """The first `max_samples` latents (diffusers' --max_train_samples)."""
        if max_samples is None or max_samples >= len(self):
            return self
        files, remaining = [], max_samples
        for path, offset, count, dtype in self.files:
            if remaining <= 0:
                break
            files.append((path, offset, min(count, remaining), dtype))
            remaining -= count
        micro = self.micro_conditioning
        if micro is not None and len(micro) > 1:
            micro = micro[:max_samples]
        return PairedLatents(files, self.captions.select(np.arange(max_samples)), self.latent_shape, self.source,
                             micro)


def _caption_rows(path, expected, flag, directory):
    """Yield (caption, micro-conditioning or None) of one caption-row file, checking there is one per latent."""
    count = line_number = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if line.strip():
                    row = json.loads(line)
                    yield row["caption"], row.get("micro_conditioning")
                    count += 1
    except FileNotFoundError:
        raise PairedDataError(f"{flag} {directory!r}: {path} is missing; regenerate the paired set.") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise PairedDataError(f"{flag} {directory!r}: {path} near line {max(line_number, 1)} is not a caption row "
                              f"({type(error).__name__}: {error}); regenerate the paired set.") from None
    if count != expected:
        raise PairedDataError(f"{flag} {directory!r}: {path} holds {count} captions for {expected} latents; "
                              "regenerate the paired set.")


class _MicroConditioningRows:
    """Collects the rows' micro-conditioning while the captions stream past: packed 32-bit integers (not a
    Python list per row, which would cost ~100 bytes each at millions of rows), one row when all are equal."""

    def __init__(self):
        self.first, self.rows, self.missing, self.count = None, None, 0, 0

    def keep(self, caption, micro):
        if micro is None:
            self.missing += 1
        elif self.first is None:
            self.first = list(micro)
        elif self.rows is None and list(micro) != self.first:
            self.rows = array.array("i", self.first * (self.count - self.missing))
        if micro is not None and self.rows is not None:
            self.rows.extend(int(value) for value in micro)
        self.count += 1
        return caption

    def as_array(self, flag, directory):
        if self.first is None:
            return None
        if self.missing:
            raise PairedDataError(f"{flag} {directory!r}: {self.missing} of {self.count} caption rows lack the "
                                  "micro_conditioning the others have; regenerate the paired set.")
        if len(self.first) != 6 or (self.rows is not None and len(self.rows) != 6 * self.count):
            raise PairedDataError(f"{flag} {directory!r}: micro_conditioning rows need 6 numbers (original size, "
                                  "crop top-left, target size); regenerate the paired set.")
        if self.rows is None:
            return np.asarray([self.first], dtype=np.int32)
        return np.frombuffer(self.rows, dtype=np.int32).reshape(-1, 6)


def manifest_problem(manifest):
    """A message when the manifest contradicts itself (counts that do not add up), else None."""
    try:
        planned = plan_shards(int(manifest["num_latents"]), int(manifest["shard_size"]))
        counts = [int(shard["num_latents"]) for shard in manifest["shards"]]
    except (KeyError, TypeError, ValueError) as error:
        return f"its manifest lacks or garbles {error}"
    if sum(counts) != manifest["num_latents"] or counts != [shard["num_latents"] for shard in planned]:
        return (f"its manifest says {manifest['num_latents']} latents in shards of {manifest['shard_size']}, but its "
                f"{len(counts)} shards hold {sum(counts)}")
    return None


def check_paired_set_is_finished(path, flag="--train_data_dir"):
    """Cheap check before anything is loaded: the manifest is consistent and complete, and every shard file
    has the size recorded when it was written (one stat per file, no data read)."""
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        manifest = read_manifest(path)
        problem = manifest_problem(manifest)
        if problem:
            raise PairedDataError(f"{flag} {path!r} is damaged: {problem}; regenerate the paired set.")
        if not manifest.get("complete"):
            raise PairedDataError(
                f"{flag} {path!r} is unfinished ({len(finished_shards(path, manifest))} of {len(manifest['shards'])} "
                "shards): re-run the same aria_utils.generate_teacher_data command to finish it, then train.")
        for shard in manifest["shards"]:
            for key in ("latents", "captions"):
                file_path = os.path.join(path, shard[key])
                size = os.path.getsize(file_path) if os.path.isfile(file_path) else None
                if f"{key}_bytes" in shard and size != shard[f"{key}_bytes"]:
                    state = "is missing" if size is None else f"has {size} bytes, {shard[f'{key}_bytes']} were written"
                    raise PairedDataError(f"{flag} {path!r}: {shard[key]} {state} (damaged or cut short): "
                                          f"{REPAIR_HINT}.")
    else:
        tensor_location(os.path.join(path, LATENTS_FILE), "latents")


def load_paired_latents(path, max_samples=None, flag="--train_data_dir"):
    """Open a paired set (sharded or single-file) for reading; `max_samples` keeps the first N."""
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        check_paired_set_is_finished(path, flag)
        manifest = read_manifest(path)
        latent_shape = tuple(manifest["latent_shape"])
        files, caption_files, total = [], [], 0
        for shard in manifest["shards"]:
            if max_samples is not None and total >= max_samples:
                break
            latents_path = os.path.join(path, shard["latents"])
            if not os.path.isfile(latents_path):
                raise PairedDataError(f"{flag} {path!r}: {shard['latents']} is missing; {REPAIR_HINT}.")
            offset, shape, dtype = tensor_location(latents_path, "latents")
            if shape != (shard["num_latents"], *latent_shape):
                raise PairedDataError(f"{flag} {path!r}: {shard['latents']} has shape {shape}, the manifest says "
                                      f"{(shard['num_latents'], *latent_shape)}; regenerate the paired set.")
            files.append((latents_path, offset, shape[0], dtype))
            caption_files.append((os.path.join(path, shard["captions"]), shape[0]))
            total += shape[0]
    else:
        latents_path = os.path.join(path, LATENTS_FILE)
        offset, shape, dtype = tensor_location(latents_path, "latents")
        latent_shape = shape[1:]
        files, caption_files = [(latents_path, offset, shape[0], dtype)], [(os.path.join(path, METADATA_FILE), shape[0])]
    micro_rows = _MicroConditioningRows()
    captions = TextTable.from_strings(micro_rows.keep(caption, micro) for file, count in caption_files
                                      for caption, micro in _caption_rows(file, count, flag, path))
    paired = PairedLatents(files, captions, latent_shape, path, micro_rows.as_array(flag, path))
    if len(paired) == 0:
        raise PairedDataError(f"{flag} {path!r} holds no latents.")
    return paired.truncated(max_samples)


# ----------------------------------------------------------------------------------------------- image datasets
def check_image_folder(train_data_dir, caption_column):
    """Cheap early check of an imagefolder: it exists and its metadata.jsonl has the caption column."""
    if not os.path.isdir(train_data_dir):
        raise PairedDataError(f"--train_data_dir {train_data_dir!r} does not exist.")
    metadata = os.path.join(train_data_dir, METADATA_FILE)
    if not os.path.isfile(metadata):
        raise PairedDataError(
            f"--train_data_dir {train_data_dir!r} has neither {MANIFEST_FILE} (teacher latents, see "
            f"aria_utils.generate_teacher_data) nor {METADATA_FILE} (an imagefolder with captions)."
        )
    with open(metadata, encoding="utf-8") as handle:
        try:
            first = json.loads(handle.readline())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PairedDataError(f"--train_data_dir {train_data_dir!r}: the first line of {metadata} is not a JSON "
                                  f"object ({error}).") from None
    if caption_column not in first:
        raise PairedDataError(
            f"--caption_column {caption_column!r} is not in {metadata}; its columns are {sorted(first)}."
        )


def load_image_caption_dataset(dataset_name=None, dataset_config_name=None, train_data_dir=None,
                               image_column="image", caption_column="text", cache_dir=None, max_train_samples=None):
    import datasets

    if dataset_name is not None:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
    else:
        check_image_folder(train_data_dir, caption_column)
        dataset = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            raise PairedDataError(f"{flag} {column!r} is not a column of the dataset; columns: {dataset.column_names}.")
    if max_train_samples is not None:
        dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    return dataset


def _image_to_tensor(image, resolution):
    """Resize the short side to `resolution`, centre-crop, scale to [-1, 1] (PIL + numpy, no torchvision).

    Also returns the SDXL micro-conditioning of the result: [original height, width, crop top, crop
    left (in the resized image, as diffusers' SDXL training script records it), target height, width].
    """
    from PIL import Image

    image = image.convert("RGB")
    original_height, original_width = image.height, image.width
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    micro_conditioning = torch.tensor([original_height, original_width, top, left, resolution, resolution])
    return torch.from_numpy(array).permute(2, 0, 1), micro_conditioning


def _caption_text(caption):
    # Datasets sometimes hold several captions per image; take the first, deterministically.
    return caption[0] if isinstance(caption, (list, tuple)) else str(caption)


def dataset_fingerprint(dataset, vae_name, resolution):
    key = json.dumps({"dataset": dataset._fingerprint, "vae": vae_name, "resolution": resolution}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class _ImageCaptionRows(torch.utils.data.Dataset):
    """Decoded, resized image tensors and captions; DataLoader workers do the PIL work in parallel."""

    def __init__(self, dataset, image_column, caption_column, resolution):
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.resolution = resolution

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[index]
        pixels, micro_conditioning = _image_to_tensor(row[self.image_column], self.resolution)
        return pixels, micro_conditioning, _caption_text(row[self.caption_column])


IMAGE_SHARD_SIZE = 4096


@torch.no_grad()
def encode_image_dataset(dataset, vae, image_column, caption_column, resolution, batch_size, cache_dir, vae_name,
                         device, dtype, show_progress=True, num_workers=0, seed=0):
    """Encode every image once with the VAE into a sharded set under `cache_dir` (keyed by a fingerprint).

    Training then reads that set memory-mapped, in float16, the same representation for the run that
    encoded it, for a resumed run and for every process.
    """
    import shutil

    from tqdm.auto import tqdm

    fingerprint = dataset_fingerprint(dataset, vae_name, resolution)
    cache_path = os.path.join(cache_dir, f"latents-{fingerprint}")
    if is_teacher_latent_dir(cache_path):
        logger.info("Reusing VAE latents cached at %s", cache_path)
        return load_paired_latents(cache_path)
    partial = cache_path + ".incomplete"
    shutil.rmtree(partial, ignore_errors=True)
    loader = torch.utils.data.DataLoader(_ImageCaptionRows(dataset, image_column, caption_column, resolution),
                                         batch_size=batch_size, shuffle=False, num_workers=num_workers)
    generator = torch.Generator().manual_seed(seed)  # the posterior sample is drawn once, reproducibly
    latent_shape = None
    pending_latents, pending_captions, pending_micro, shard_index, written = [], [], [], 0, 0
    manifest = None
    for pixels, batch_micro, batch_captions in tqdm(loader, desc="Encoding images", disable=not show_progress):
        posterior = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device=device, dtype=posterior.mean.dtype)
        encoded = latents_from_vae(posterior.mean + posterior.std * noise, vae.config)
        pending_latents.append(encoded.float().cpu())
        pending_captions.extend(batch_captions)
        pending_micro.extend(batch_micro.tolist())
        if manifest is None:
            latent_shape = encoded.shape[1:]
            manifest = new_manifest(len(dataset), IMAGE_SHARD_SIZE, latent_shape,
                                    {"vae": vae_name, "resolution": resolution, "dataset_fingerprint": fingerprint})
            os.makedirs(partial, exist_ok=True)
            write_manifest(partial, manifest)
        while len(pending_captions) >= IMAGE_SHARD_SIZE or (pending_captions and written + len(pending_captions)
                                                             == len(dataset)):
            latents = torch.cat(pending_latents)
            count = min(IMAGE_SHARD_SIZE, len(pending_captions))
            rows = [{"index": written + i, "caption": caption, "micro_conditioning": micro}
                    for i, (caption, micro) in enumerate(zip(pending_captions[:count], pending_micro[:count]))]
            write_shard(partial, shard_index, latents[:count], rows)
            pending_latents, pending_captions = [latents[count:]], pending_captions[count:]
            pending_micro = pending_micro[count:]
            shard_index, written = shard_index + 1, written + count
    manifest["complete"] = True
    write_manifest(partial, manifest)
    os.replace(partial, cache_path)
    return load_paired_latents(cache_path)
