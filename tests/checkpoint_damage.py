"""Ways a checkpoint step directory gets damaged (a killed copy, a full disk, a hand edit, failing storage),
and the reason the training restore gives for skipping each."""

import os
import pathlib
import shutil

KINDS = ("truncated array files", "missing manifest", "missing item", "empty step directory",
         "missing data iterator file", "truncated data iterator file", "flipped bytes in a model array",
         "flipped bytes in an optimizer array")

REASONS = {
    "truncated array files": "restoring it failed",  # only visible when the arrays are read
    "missing manifest": "model/manifest.ocdbt is missing",
    "missing item": "item 'opt' is missing",
    "empty step directory": "the step directory is empty",
    "missing data iterator file": "data/ holds no data iterator state",
    "truncated data iterator file": "data/process_0-of-1.json is not a readable data iterator state",
    # Files that still read, with other values: only the digests saved with the step tell.
    "flipped bytes in a model array": "arrays differ from their saved digests (model/",
    "flipped bytes in an optimizer array": "arrays differ from their saved digests (opt/",
}

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_frames(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the zstd frames an OCDBT data file begins with: one compressed array chunk each."""
    frames, i = [], 0
    while data.startswith(_ZSTD_MAGIC, i):
        descriptor = data[i + 4]
        single_segment, dict_id, size_flag = (descriptor >> 5) & 1, descriptor & 3, descriptor >> 6
        j = i + 5 + (1 - single_segment) + (0, 1, 2, 4)[dict_id] + (single_segment, 2, 4, 8)[size_flag]
        last = False
        while not last:
            header = int.from_bytes(data[j:j + 3], "little")
            last, kind = header & 1, (header >> 1) & 3
            j += 3 + (1 if kind == 1 else header >> 3)  # an RLE block stores one byte
        j += 4 * ((descriptor >> 2) & 1)  # content checksum
        frames.append((i, j))
        i = j
    return frames


def _flip_bytes(item_dir: pathlib.Path) -> None:
    """64 bytes inverted in the middle of the item's largest array chunk (the same chunk whatever order the
    writes reached the files in): the file still decodes, to other values."""
    chunks = [(end - start, data[start:end], f, start) for f in sorted(item_dir.glob("ocdbt.process_*/d/*"))
              for data in [f.read_bytes()] for start, end in _zstd_frames(data)]
    size, _, f, start = max(chunks)
    data = bytearray(f.read_bytes())
    middle = start + size // 2 - 32
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    f.write_bytes(bytes(data))


def corrupt(step_dir: pathlib.Path, how: str) -> None:
    if how == "truncated array files":
        # Every data file of the model item (an interrupted copy): OCDBT may leave some file unreferenced, so
        # cutting one file alone does not always damage the step.
        for f in (step_dir / "model").glob("**/d/*"):
            os.truncate(f, min(100, f.stat().st_size))
    elif how == "missing manifest":
        (step_dir / "model" / "manifest.ocdbt").unlink()
    elif how == "missing item":
        shutil.rmtree(step_dir / "opt")
    elif how == "empty step directory":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    elif how == "missing data iterator file":
        (step_dir / "data" / "process_0-of-1.json").unlink()
    elif how == "truncated data iterator file":
        os.truncate(step_dir / "data" / "process_0-of-1.json", 3)
    elif how == "flipped bytes in a model array":
        _flip_bytes(step_dir / "model")
    elif how == "flipped bytes in an optimizer array":
        _flip_bytes(step_dir / "opt")
    else:
        raise ValueError(f"unknown damage {how!r}")
