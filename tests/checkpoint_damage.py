"""Ways a checkpoint step directory gets damaged (a killed copy, a full disk, a hand edit), and the reason
the training restore gives for skipping each."""

import os
import pathlib
import shutil

KINDS = ("truncated array files", "missing manifest", "missing item", "empty step directory",
         "missing data iterator file", "truncated data iterator file")

REASONS = {
    "truncated array files": "restoring it failed",  # only visible when the arrays are read
    "missing manifest": "model/manifest.ocdbt is missing",
    "missing item": "item 'opt' is missing",
    "empty step directory": "the step directory is empty",
    "missing data iterator file": "data/ holds no data iterator state",
    "truncated data iterator file": "data/process_0-of-1.json is not a readable data iterator state",
}


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
    else:
        raise ValueError(f"unknown damage {how!r}")
