"""Writing files so that nothing is lost or half-visible, and others can read the results.

- Atomic: write to a temporary name in the same folder, flush to disk, then rename. A process
  killed mid-write leaves a `*.tmp` file that no reader ever picks up.
- Readable: the safetensors writer creates files with mode 0600 whatever the umask, so results
  on a shared cluster would be private to whoever trained them. Every file written here (and every
  folder written by `save_pretrained`, via `apply_umask_tree`) gets the mode the umask gives.
"""

import json
import os

TEMPORARY_SUFFIX = ".tmp"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path):
    """Give `path` the permissions a plain `open(path, "w")` (or `mkdir`) would have had."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def apply_umask_tree(root):
    """`apply_umask` on a folder and everything under it (for folders written by `save_pretrained`)."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _commit(temporary, path):
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    apply_umask(temporary)
    os.replace(temporary, path)


def write_json_atomically(path, data):
    temporary = path + TEMPORARY_SUFFIX
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    _commit(temporary, path)


def write_bytes_atomically(path, data):
    temporary = path + TEMPORARY_SUFFIX
    with open(temporary, "wb") as handle:
        handle.write(data)
    _commit(temporary, path)


def save_safetensors_atomically(tensors, path, metadata=None):
    """torch tensors -> `path` in safetensors, atomically and readable per the umask."""
    from safetensors.torch import save_file

    temporary = path + TEMPORARY_SUFFIX
    save_file({key: value.contiguous() for key, value in tensors.items()}, temporary, metadata=metadata)
    _commit(temporary, path)


def save_numpy_safetensors_atomically(arrays, path):
    import numpy as np
    from safetensors.numpy import save_file

    temporary = path + TEMPORARY_SUFFIX
    save_file({key: np.ascontiguousarray(value) for key, value in arrays.items()}, temporary)
    _commit(temporary, path)


def read_safetensors_header(path):
    """(header, data start, file size) of a safetensors file, without reading any tensor.

    The layout is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and data offsets (relative to the data start), then the raw data. Raises ValueError when
    the header length does not fit the file (a truncated or foreign file).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if not 0 < header_length <= size - 8:
            raise ValueError("its header is cut off")
        header = json.loads(handle.read(header_length))
    return header, 8 + header_length, size

