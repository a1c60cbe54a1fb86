"""The one door every Playground model-file read goes through, and the count of reads it keeps (tests and
`sdstudio bench generate` check that a weight change reads nothing)."""
from __future__ import annotations

import threading
from pathlib import Path

# Every adapter file read increments this (tests and `sdstudio bench generate` count reads with it).
FILE_READS = {"count": 0}
_READ_LOCK = threading.Lock()


def count_read() -> None:
    """Count one model-file read (ControlNet and T2I-Adapter folders are read by diffusers, not here)."""
    with _READ_LOCK:
        FILE_READS["count"] += 1


def read_adapter_file(path: Path, allow_pickle: bool = False, embedding: bool = False) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of an adapter or embedding file: the one function that reads them, and
    the one door that refuses NaN/inf/empty tensors. An embedding's .pt is read with weights_only=True by default
    (formats.embeddings.read_embedding_state)."""
    from ..formats.embeddings import read_embedding_state
    from ..formats.safe_io import check_tensors, load_state_dict, read_safetensors_metadata

    count_read()
    sd = read_embedding_state(path, allow_pickle) if embedding else load_state_dict(path, allow_pickle=allow_pickle)
    check_tensors(sd, path.name)
    meta = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return sd, meta
