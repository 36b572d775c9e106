"""Raw draws on disk: every chain's probe losses at every draw, streamed while sampling, one ``.npz`` after.

While the chains run, ``RawWriter`` fills a float32 array [chains, draws, N, K] memory-mapped in a hidden temporary
folder beside the target (``storage.temporary_sibling``: the stale-temporary cleaner knows the name), so the draws
never sit in memory; at the end the array and the run's metadata are packed, uncompressed, into a temporary ``.npz``
that is renamed into place (the file exists whole or not at all). ``np.load(path)`` reads it as any ``.npz``;
``open_draws(path)`` maps the ``losses`` member straight from the file (it is stored, not deflated) so that the
blocked influence computation (``bif.py``) reads a block of examples at a time. Disk: 4·C·D·N·K bytes.

Members: ``losses`` [C, D, N, K] float32, ``weights`` [N, K], ``probe_names`` [O], ``probe_offsets`` [O+1],
``group_names`` [G], ``group_bounds`` [G, 2], ``draws`` [steps, burn_in, thin], and ``inputs`` [N, ...] when the probe
inputs are numbers (a language model's token ids).
"""

from __future__ import annotations

import os
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FastLLCError
from ..storage import check_writable_file, remove, temporary_sibling, writing

_CHUNK = 16 << 20  # bytes copied at a time when packing


def check_raw_path(path) -> Path:
    """``path`` as the draws file: a ``.npz`` that does not exist yet, in a writable place (one-line errors)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise FastLLCError(f"raw draws are written to a .npz file, got {os.fspath(path)!r}")
    if path.exists():
        raise FastLLCError(f"{os.fspath(path)!r} exists; fastllc never reuses or overwrites a run's draws: remove it "
                           "or choose another path")
    check_writable_file(path)
    return path


class RawWriter:
    """The draws streamed into a memory-mapped array, packed into ``path`` by ``finish`` (module docstring)."""

    def __init__(self, path, chains: int, draws: int, examples: int, elements: int):
        self.path = check_raw_path(path)
        self.folder = temporary_sibling(self.path)
        with writing(self.path):
            self.folder.mkdir(parents=True)
            self.losses = np.lib.format.open_memmap(self.folder / "losses.npy", mode="w+", dtype=np.float32,
                                                    shape=(chains, draws, examples, elements))

    def write(self, lo: int, hi: int, draw: int, x: torch.Tensor) -> None:
        self.losses[lo:hi, draw] = x.detach().to("cpu", torch.float32).numpy()

    def finish(self, probes, groups: dict, draws) -> Path:
        meta = {"weights": probes.weights.numpy(), "probe_names": np.array(probes.names),
                "probe_offsets": np.array(probes.offsets), "group_names": np.array(list(groups)),
                "group_bounds": np.array(list(groups.values()), dtype=np.int64).reshape(-1, 2),
                "draws": np.array([draws.steps, draws.burn_in, draws.thin])}
        if not probes.inputs.is_floating_point() or probes.inputs.numel() < 1e7:
            meta["inputs"] = probes.inputs.numpy()
        self.losses.flush()
        packed = temporary_sibling(self.path)
        try:
            with writing(self.path):
                _pack(packed, self.folder / "losses.npy", meta)
                os.replace(packed, self.path)
        finally:
            remove(packed)
            self.abort()
        return self.path

    def abort(self) -> None:
        self.losses = None
        remove(self.folder)


def _pack(target: Path, losses: Path, meta: dict) -> None:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("losses.npy", "w", force_zip64=True) as member, open(losses, "rb") as source:
            shutil.copyfileobj(source, member, _CHUNK)
        for name, value in meta.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


@dataclass
class RawDraws:
    """A packed run's draws: ``losses`` memory-mapped [C, D, N, K] float32, the metadata as arrays."""

    path: Path
    losses: np.ndarray
    meta: dict

    @property
    def group_bounds(self) -> dict:
        return {str(n): tuple(int(v) for v in b) for n, b in zip(self.meta["group_names"], self.meta["group_bounds"])}


def open_draws(path) -> RawDraws:
    """The ``.npz`` that ``RawWriter`` packed, its losses mapped from the file (read lazily, block by block)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("losses.npy")
            names = [n[:-4] for n in archive.namelist() if n != "losses.npy"]
        with np.load(path, allow_pickle=False) as loaded:
            meta = {name: loaded[name] for name in names}
        losses = _map_member(path, info)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise FastLLCError(f"{os.fspath(path)!r} is not a draws file written by fastllc.observables ({err})") from None
    return RawDraws(path, losses, meta)


def _map_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    """A stored (uncompressed) ``.npy`` member of a zip as a read-only memory map."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError("the losses member is compressed")
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        header = file.read(30)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        file.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(file)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(file)
        offset = file.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


__all__ = ["RawDraws", "RawWriter", "check_raw_path", "open_draws"]
