"""Repair an interrupted recording: :func:`recover_episode` turns the file a crash or ``kill -9`` left
(written in SWMR mode, every row flushed before the kill readable) into an ordinary HDF5 episode.

Usage::

    from vla_edge.edge.episodes.repair import recover_episode

    n_ticks = recover_episode("episodes/episode_3.hdf5")   # rewrites the file in place

The file's layout is :mod:`.format`'s; the recorder (:mod:`.recorder`) writes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
from vla_edge.edge.episodes.format import per_tick_datasets

COPY_ROWS = 64
"""Rows copied at a time (bounded memory for long image datasets)."""


def recover_episode(path: str | Path) -> int:
    """Turn the file of an interrupted recording into an ordinary HDF5 file; return its tick count.

    Per-tick datasets are cut to the shortest one (a kill during a tick's writes may leave some a row
    ahead); the file is rewritten next to the original and renamed over it.
    """
    path = Path(path)
    tmp = path.with_suffix(".recovering.hdf5")
    with h5py.File(path, "r", swmr=True) as src:
        per_tick = per_tick_datasets(src)
        n = min(src[name].shape[0] for name in per_tick)
        with h5py.File(tmp, "w") as dst:
            dst.attrs.update(src.attrs)

            def copy(name, obj):
                if isinstance(obj, h5py.Group):
                    dst.require_group(name).attrs.update(obj.attrs)
                    return
                rows = n if name in per_tick else obj.shape[0]
                ds = dst.create_dataset(name, shape=(rows, *obj.shape[1:]), maxshape=obj.maxshape, dtype=obj.dtype,
                                        chunks=obj.chunks, compression=obj.compression,
                                        compression_opts=obj.compression_opts)
                for start in range(0, rows, COPY_ROWS):
                    ds[start : start + COPY_ROWS] = obj[start : min(start + COPY_ROWS, rows)]
                ds.attrs.update(obj.attrs)

            src.visititems(copy)
    os.replace(tmp, path)
    return n
