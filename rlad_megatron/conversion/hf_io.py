"""Streaming Hugging Face safetensors I/O: a lazy reader and a shard-as-you-go writer.

`HFReader` opens each `*.safetensors` file with `safe_open` and reads one tensor at a time, so a
converter holds only the tensors of the rule it is working on. `HFShardWriter` knows the
whole plan (names, shapes, dtypes) up front, writes each shard's safetensors header first and
then streams every tensor's bytes straight to disk; `write_index` writes
`model.safetensors.index.json`. `publish_step_folder` makes an
export visible atomically (`step_N.tmp` -> `step_N`, then a `latest` pointer file).

Left out: reading pickled `pytorch_model.bin` checkpoints (convert them with transformers first).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
# Non-weight files of a HF folder that an export carries over unchanged.
METADATA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class HFReader:
    """Lazy access to the tensors of a HF folder (single file or sharded with an index).

    Each `get` opens the file, reads one tensor and closes it: safetensors memory-maps files and
    the pages a read touches stay resident (and counted in RSS) for as long as a handle is open.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{self.folder}: shards listed in {INDEX_NAME} are missing: {missing}; "
                    "copy the complete folder (or re-export it)"
                )
        elif (self.folder / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"no model.safetensors or {INDEX_NAME} in {self.folder}; convert .bin checkpoints to safetensors first"
            )
        self.weight_map: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:  # headers only: names and shapes, no tensor data
            with safe_open(str(self.folder / file), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    self.weight_map[name] = file
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _file(self, name: str) -> str:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is missing from the HF checkpoint {self.folder}")
        return str(self.folder / self.weight_map[name])

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk; raise naming it when absent."""
        with safe_open(self._file(name), "pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header, without reading the data."""
        self._file(name)
        return self._shapes[name]

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can release readers uniformly."""


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
    """Split an ordered list of (name, shape, dtype) into consecutive shards of <= max_shard_bytes."""
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype))
        size += nbytes
    return [s for s in shards if s]


def safetensors_header(entries) -> tuple[bytes, dict[str, int], int]:
    """(header bytes incl. the 8-byte length, name -> absolute data offset in the file, file size)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    relative = {}
    for name, shape, dtype in entries:
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be exported; use bf16, fp16 or fp32")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        relative[name] = offset
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    start = 8 + len(blob)
    return struct.pack("<Q", len(blob)) + blob, {n: start + o for n, o in relative.items()}, start + offset


class _StreamingSafetensors:
    """One safetensors file written tensor by tensor: the header (known shapes) first, then raw bytes."""

    def __init__(self, path: Path, entries) -> None:
        blob, _, _ = safetensors_header(entries)
        self._expected = [(n, tuple(s), d) for n, s, d in entries]
        self._next = self.num_written = 0
        self._file = open(path, "wb")  # noqa: SIM115 (stays open across write() calls; closed after the last tensor)
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> bool:
        """Append one tensor (must come in header order); True when the file is complete."""
        exp_name, exp_shape, exp_dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (exp_name, exp_shape, exp_dtype):
            raise ValueError(
                f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} arrived where "
                f"{exp_name!r} {exp_shape} {exp_dtype} was planned"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data.numpy().data)  # a memoryview of the tensor bytes: no extra copy
        self._next += 1
        self.num_written = self._next
        if self._next == len(self._expected):
            self._file.close()
            return True
        return False


class HFShardWriter:
    """Write a planned, ordered list of HF tensors into `<prefix>-0000k-of-0000n.safetensors` shards.

    The plan (name, shape, dtype per tensor, in arrival order) is known up front from the config,
    so each shard's header is written first and every tensor goes straight to disk: memory held is
    the tensor being written, nothing more. Several writers (one per pipeline stage) may share a
    folder with distinct prefixes; merge their `weight_map`s with `write_index`.
    """

    def __init__(self, out_dir: str | Path, entries, max_shard_bytes: int = 2 << 30, prefix: str = "model") -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shards = plan_shards(list(entries), max_shard_bytes)
        n = len(self._shards)
        self._files = [f"{prefix}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.weight_map = {name: file for file, shard in zip(self._files, self._shards) for name, _, _ in shard}
        self.total_bytes = sum(math.prod(s) * d.itemsize for shard in self._shards for _, s, d in shard)
        self._shard_index = 0
        self._current: _StreamingSafetensors | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._shard_index >= len(self._shards):
            raise ValueError(f"tensor {name!r} arrived after every planned tensor was written")
        if self._current is None:
            path = self.out_dir / self._files[self._shard_index]
            self._current = _StreamingSafetensors(path, self._shards[self._shard_index])
        if self._current.write(name, tensor):
            self._current = None
            self._shard_index += 1

    def finish(self) -> dict[str, str]:
        """Check every planned tensor arrived; return the weight map (name -> file)."""
        if self._shard_index != len(self._shards):
            done = self._current.num_written if self._current else 0
            missing = self._shards[self._shard_index][done][0]
            raise ValueError(f"export ended early: tensors from {missing!r} on were never written")
        return dict(self.weight_map)


def write_index(out_dir: str | Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """Write `model.safetensors.index.json` (HF's format: metadata.total_size + weight_map)."""
    index = {"metadata": {"total_size": int(total_bytes)}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_hf_metadata(
    src_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None, config: dict | None = None
) -> None:
    """Copy config.json (with `dtype` updated) and the tokenizer / generation files of `src_dir`."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = json.loads((src / "config.json").read_text())
    config = dict(config)
    if dtype is not None:
        config["dtype"] = DTYPE_NAMES[dtype]
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in METADATA_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def publish_step_folder(tmp_dir: str | Path, final_dir: str | Path) -> Path:
    """Atomically expose a finished export: rename `tmp_dir` to `final_dir`, then point `latest` at it.

    Readers either see the complete previous step or the complete new one, never a half-written
    folder (rename is atomic on one filesystem; `latest` is replaced with os.replace).
    """
    tmp, final = Path(tmp_dir), Path(final_dir)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = final.parent / "latest"
    pointer_tmp = final.parent / ".latest.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, pointer)
    return final


def prune_steps(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` `step_N` folders (never the one `latest` names)."""
    root = Path(root)
    steps = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
    )
    latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    doomed = [p for p in steps[:-keep_last] if p.name != latest] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resolve_latest(root: str | Path) -> Path:
    """The folder the `latest` pointer of an export root names."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.exists():
        raise FileNotFoundError(f"no 'latest' pointer in {root}; nothing has been exported there yet")
    name = pointer.read_text().strip()
    # Only a published `step_N` folder: never a `.tmp` export in progress or a path outside the root.
    if not (name.startswith("step_") and name[5:].isdigit()) or not (root / name).is_dir():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a complete step_N export folder in {root}")
    return root / name
