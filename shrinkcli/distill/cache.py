"""Teacher-output cache (`--cache-teacher`): run the frozen teacher once per image, not once per epoch.

The training engine only ever flips images (no other augmentation) and the teacher is frozen in
eval mode, so its output for a given (dataset index, flip) never changes. A first pass computes the
embedding (and, when stage losses need them, the four stage maps) of every image and of its mirror,
stores them as `.npy` files, and every later step looks them up by (index, flip) instead of running
the teacher. Embeddings are kept in float32, so a cached run trains exactly like an inline one;
stage maps are stored in float16 by default to halve their (large) disk size, which changes them by
at most about 1e-3 relative; `cache_dtype = "float32"` stores them exactly, and a cached run then
trains exactly like an inline one with stage losses too.

Layout of a cache directory: `key.json` (written last: its presence marks a complete cache),
`embeddings.npy` float32 `[flips, N, D]`, `stage1..4.npy` float16 or float32 `[flips, N, C, H, W]`, where flip 0
is the image as stored and flip 1 its horizontal mirror.

Invalidation: the key is the sha256 of the teacher artifact's sha256, the dataset (spec, length,
label checksum) and the transform (input size, crop, mean, std). Any change gives another key, and
a directory whose `key.json` holds another key (or lacks an array it should have) is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from shrinkcli import log
from shrinkcli.atomic import atomic_write_json
from shrinkcli.errors import BadInputError

CACHE_FORMAT = 1
KEY_FILE = "key.json"

# (images) -> (stage maps, embedding), both as the teacher would give them inline.
TeacherFn = Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]


def cache_key(*, teacher_sha256: str, data_spec: str, num_items: int, labels: Any,
              input_size: int, crop: int | None, mean: float, std: float) -> str:
    """The invalidation key: changes whenever the teacher, the images or their preprocessing change."""
    label_bytes = np.ascontiguousarray(np.asarray(labels if labels is not None else [], dtype=np.int64)).tobytes()
    parts = {
        "format": CACHE_FORMAT,
        "teacher_sha256": teacher_sha256,
        "data": {"spec": str(data_spec), "len": int(num_items),
                 "labels_sha256": hashlib.sha256(label_bytes).hexdigest()},
        "transform": {"input_size": int(input_size), "crop": crop, "mean": float(mean), "std": float(std)},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class TeacherCache:
    """Cached teacher outputs, looked up by dataset index and flip flag."""

    def __init__(self, directory: Path, embeddings: np.ndarray, stages: list[np.ndarray] | None):
        self.directory = Path(directory)
        # Memory-mapped (copy-on-write, so torch can view it), like the stage maps: W ranks on one
        # machine share one copy in the page cache instead of each holding the array in RAM.
        self.embeddings = torch.from_numpy(embeddings)
        self.stage_maps = stages
        self.flips = embeddings.shape[0]
        self.device_embeddings: torch.Tensor | None = None

    def place(self, device: torch.device | str, max_fraction: float = 0.25) -> bool:
        """Keep the embeddings on a CUDA device when they take at most `max_fraction` of its free
        memory, so a lookup is one on-device gather; True when they are there."""
        device = torch.device(device)
        if device.type != "cuda":
            return False
        free, _total = torch.cuda.mem_get_info(device)
        if self.embeddings.numel() * self.embeddings.element_size() > max_fraction * free:
            return False
        self.device_embeddings = self.embeddings.to(device)
        return True

    @property
    def has_stages(self) -> bool:
        return self.stage_maps is not None

    def lookup(self, indices: torch.Tensor, flipped: torch.Tensor | None, device: torch.device | str = "cpu",
               with_stages: bool = True) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        """Teacher (stage maps as float32 or None, embedding) for a batch of (index, flip).

        The trainer passes indices and flip flags from the host: nothing here reads the device.
        Rows gathered on the host travel from pinned memory, so their copy does not block."""
        device = torch.device(device)
        idx = indices.detach().to("cpu", torch.long)
        flip = torch.zeros_like(idx) if flipped is None else flipped.detach().to("cpu", torch.long)
        if len(flip) and int(flip.max()) >= self.flips:
            raise RuntimeError("teacher cache holds no flipped outputs but a flipped batch was requested")
        pin = device.type == "cuda"
        if self.device_embeddings is not None and self.device_embeddings.device == device:
            rows = torch.stack([flip, idx])
            rows = (rows.pin_memory() if pin else rows).to(device, non_blocking=True)
            embedding = self.device_embeddings[rows[0], rows[1]]
        else:
            embedding = _to_device(self.embeddings[flip, idx], device, pin)
        maps = None
        if with_stages and self.stage_maps is not None:
            i_np, f_np = idx.numpy(), flip.numpy()
            maps = [_to_device(torch.from_numpy(np.asarray(arr[f_np, i_np])), device, pin).float() for arr in self.stage_maps]
        return maps, embedding

    @classmethod
    def open(cls, directory: Path, key: str, *, num_items: int, flips: int, with_stages: bool,
             stage_dtype: str = "float16") -> "TeacherCache | None":
        """The cache in `directory` if it is complete and made for `key`; otherwise None."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / KEY_FILE).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != key or meta.get("flips", 0) < flips or (with_stages and not meta.get("stages")):
            return None
        if with_stages and meta.get("stage_dtype", "float16") != stage_dtype:
            return None
        try:
            embeddings = np.load(directory / "embeddings.npy", mmap_mode="c")
            stages = None
            if with_stages:
                stages = [np.load(directory / f"stage{k + 1}.npy", mmap_mode="r") for k in range(len(meta["stages"]))]
        except (OSError, ValueError):
            return None
        if embeddings.shape[:2] != (meta["flips"], num_items) or any(s.shape[1] != num_items for s in stages or []):
            return None
        return cls(directory, embeddings, stages)


def _to_device(rows: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    return (rows.pin_memory() if pin else rows).to(device, non_blocking=pin)


def _estimate_bytes(num_items: int, flips: int, embedding_size: int, stage_shapes: Sequence[Sequence[int]] | None,
                    stage_bytes: int = 2) -> int:
    per_item = embedding_size * 4 + sum(int(np.prod(s)) * stage_bytes for s in stage_shapes or [])
    return num_items * flips * per_item


def build_cache(directory: Path, key: str, dataset: Any, teacher_fn: TeacherFn, *, device: torch.device,
                flips: int, with_stages: bool, batch_size: int = 64, workers: int = 0,
                channels_last: bool = False, progress: bool = False, stage_dtype: str = "float16") -> TeacherCache:
    """One pass of the teacher over `dataset` (and its mirror when flips == 2), written to `directory`.

    Under torchrun every rank fills its own contiguous slice of the arrays in parallel (rank 0
    creates them first), so the pass takes 1/W of the time and no rank idles in a barrier for the
    whole pass. Arrays are written under temporary names and renamed into place, and `key.json` goes
    last, so an interrupted pass leaves no cache that `TeacherCache.open` would accept.
    """
    from torch.utils.data import DataLoader, Subset

    from shrinkcli.engine import distributed as ddp

    if stage_dtype not in ("float16", "float32"):
        raise BadInputError(f"cache_dtype must be float16 or float32, got {stage_dtype!r}")
    np_stage_dtype = np.dtype(stage_dtype)
    info = ddp.env_dist_info()
    directory = Path(directory)
    num_items = len(dataset)
    if num_items < info.world_size:
        raise BadInputError(f"cannot cache teacher outputs of {num_items} image(s) over {info.world_size} processes",
                            hint="check --data")
    begin, end = num_items * info.rank // info.world_size, num_items * (info.rank + 1) // info.world_size
    # A private generator: building the cache must not advance the global RNG, or the cached run
    # would shuffle and flip differently from the same run without a cache.
    loader = DataLoader(Subset(dataset, range(begin, end)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, generator=torch.Generator().manual_seed(0),
                        pin_memory=device.type == "cuda")
    stage_torch_dtype = torch.float16 if stage_dtype == "float16" else torch.float32
    arrays: dict[str, np.ndarray] | None = None
    temp_paths = {"embeddings": directory / ".embeddings.npy.tmp"}
    done = 0
    for images, _labels, indices in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        rows = indices.numpy()       # the dataset's own indices: Subset keeps them
        outputs = [teacher_fn(images if flip == 0 else torch.flip(images, dims=[3])) for flip in range(flips)]
        if arrays is None:      # the first batch gives the shapes: size the arrays, then keep going
            maps, emb = outputs[0]
            arrays = _open_arrays(directory, temp_paths, num_items, flips, int(emb.shape[1]),
                                  [tuple(m.shape[1:]) for m in maps] if with_stages else None, np_stage_dtype)
        for flip, (maps, emb) in enumerate(outputs):
            arrays["embeddings"][flip, rows] = emb.float().cpu().numpy()
            for k, m in enumerate(maps if with_stages else []):
                arrays[f"stage{k + 1}"][flip, rows] = m.to(stage_torch_dtype).cpu().numpy()
        done += len(rows)
        if progress and info.is_main:
            log.info(f"teacher cache: {done}/{end - begin} images of this process")
    for arr in (arrays or {}).values():
        arr.flush()
    del arrays
    ddp.barrier()
    if info.is_main:
        for name, tmp in temp_paths.items():
            os.replace(tmp, directory / f"{name}.npy")
        atomic_write_json(directory / KEY_FILE, {"key": key, "format": CACHE_FORMAT, "flips": flips,
                                                 "num_items": num_items,
                                                 "stages": [n for n in temp_paths if n.startswith("stage")],
                                                 "stage_dtype": stage_dtype})
    ddp.barrier()
    cache = TeacherCache.open(directory, key, num_items=num_items, flips=flips, with_stages=with_stages,
                              stage_dtype=stage_dtype)
    if cache is None:
        raise RuntimeError(f"the teacher cache just written to {directory} does not open")
    return cache


def _open_arrays(directory: Path, temp_paths: dict[str, Path], num_items: int, flips: int, embedding_size: int,
                 stage_shapes: list[tuple[int, ...]] | None, stage_dtype: np.dtype) -> dict[str, np.ndarray]:
    """Rank 0 creates the temporary arrays at full size; then every rank opens them for writing."""
    from shrinkcli.engine import distributed as ddp

    shapes = {"embeddings": ((flips, num_items, embedding_size), np.dtype(np.float32))}
    for k, shape in enumerate(stage_shapes or []):
        temp_paths[f"stage{k + 1}"] = directory / f".stage{k + 1}.npy.tmp"
        shapes[f"stage{k + 1}"] = ((flips, num_items, *shape), stage_dtype)
    if ddp.env_dist_info().is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:      # a file in the way, no permission, a read-only disk
            raise BadInputError(f"cannot create the teacher cache {directory}: {exc.strerror or exc}",
                                hint="choose a writable --set cache_dir=DIR") from exc
        (directory / KEY_FILE).unlink(missing_ok=True)
        _check_disk_space(directory, _estimate_bytes(num_items, flips, embedding_size, stage_shapes,
                                                     stage_dtype.itemsize))
        for name, (shape, dtype) in shapes.items():
            np.lib.format.open_memmap(temp_paths[name], mode="w+", dtype=dtype, shape=shape).flush()
    ddp.barrier()
    return {name: np.load(temp_paths[name], mmap_mode="r+") for name in shapes}


def _check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free * 0.9:
        raise BadInputError(f"the teacher cache needs {needed / 2**30:.1f} GiB in {directory}, only {free / 2**30:.1f} GiB free",
                            hint="free disk space, set cache_dir to a larger disk, or drop stage losses from the cache "
                                 "(--no-cache-teacher runs the teacher every step instead)")
    log.info(f"teacher cache: {needed / 2**20:.0f} MiB in {directory}")


def open_or_build(directory: Path, key: str, dataset: Any, teacher_fn: TeacherFn, **kwargs: Any) -> TeacherCache:
    """Reuse the cache in `directory` when its key matches, else compute it (one teacher pass)."""
    from shrinkcli.engine import distributed as ddp

    cache = TeacherCache.open(directory, key, num_items=len(dataset), flips=kwargs["flips"],
                              with_stages=kwargs["with_stages"], stage_dtype=kwargs.get("stage_dtype", "float16"))
    # Every rank takes rank 0's decision, so all of them build together or none does.
    if ddp.broadcast_object(cache is not None):
        if cache is None:
            raise RuntimeError(f"teacher cache {directory} opens on rank 0 but not on this rank")
        log.info(f"teacher cache: reusing {directory}")
        return cache
    log.info(f"teacher cache: computing teacher outputs for {len(dataset)} images x {kwargs['flips']} flip(s)")
    return build_cache(directory, key, dataset, teacher_fn, **kwargs)
