"""Streaming access to Hugging Face safetensors directories.

`DenseCheckpoint` reads config.json and the tensors of a single-file or sharded
(`model.safetensors.index.json`) checkpoint one tensor at a time through `safe_open`.

`ShardedWriter` writes the output without ever holding it: every output tensor's name, shape and
dtype are known before any data exists, so each shard's safetensors header is written first and
each tensor's bytes go straight to their final offset as soon as they are computed. Peak memory is
one tensor plus whatever the caller holds (one layer's dense FFN), whatever the shard size.

safetensors file format (the part used here): 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data;
offsets are relative to the end of the header and must tile the data region without gaps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


class DenseCheckpoint:
    """A read-only HF checkpoint directory: config.json plus safetensors weights."""

    def __init__(self, src_dir: Path):
        self.dir = Path(src_dir)
        if not self.dir.is_dir():
            raise ValueError(f"--src {self.dir} is not a directory; point --src at a Hugging Face "
                             "checkpoint directory (config.json + *.safetensors)")
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"--src {self.dir} has no config.json; save the model with "
                             "save_pretrained() or copy its config.json next to the weights")
        self.config: dict = json.loads(config_path.read_text())
        self.weight_map = self._read_weight_map()
        self._handles: dict[Path, object] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.dir / INDEX_NAME
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no 'weight_map'; re-save the checkpoint with "
                                 "save_pretrained()")
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise ValueError(f"{index_path} lists shard(s) {missing} that are not in --src; "
                                 "copy the missing shards")
            return dict(weight_map)
        single = self.dir / SINGLE_NAME
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return {key: SINGLE_NAME for key in f.keys()}
        if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
            raise ValueError(f"--src {self.dir} holds PyTorch pickle weights only; re-save with "
                             "save_pretrained(safe_serialization=True) to get safetensors")
        raise ValueError(f"--src {self.dir} has neither {SINGLE_NAME} nor {INDEX_NAME}; the "
                         "converter reads Hugging Face safetensors checkpoints")

    def weight_files(self) -> list[str]:
        files = sorted(set(self.weight_map.values()))
        return ([INDEX_NAME] if (self.dir / INDEX_NAME).is_file() else []) + files

    def _file(self, key: str) -> Path:
        if key not in self.weight_map:
            raise ValueError(f"--src {self.dir}: tensor {key!r} is missing from the checkpoint; "
                             "it is incomplete or not a dense Llama/Mistral/Qwen2 model")
        return self.dir / self.weight_map[key]

    def _header_handle(self, key: str):
        # Cached handles are used for headers only: data read through a long-lived handle stays
        # resident as mapped file pages and RSS would grow with the model.
        path = self._file(key)
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def spec(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype code) from the header, without reading the data."""
        tensor_slice = self._header_handle(key).get_slice(key)
        return tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()

    def get(self, key: str) -> torch.Tensor:
        """One tensor; treat it as read-only. It may stay backed by the file's mapping until the
        caller drops it, which is the point: memory is released tensor by tensor, not when the
        whole shard is closed."""
        with safe_open(str(self._file(key)), framework="pt") as f:
            return f.get_tensor(key)

    def close(self):
        self._handles.clear()


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "BF16"

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=CODE_DTYPES[self.dtype]).element_size()


def assign_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in order: start a new shard when the next tensor would overflow the current one."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardedWriter:
    """Writes planned tensors, in any order, into `model-XXXXX-of-YYYYY.safetensors` + index."""

    def __init__(self, out_dir: Path, specs: Sequence[TensorSpec], max_shard_bytes: int,
                 metadata: dict[str, str]):
        names = [s.name for s in specs]
        assert len(set(names)) == len(names), "output plan has duplicate tensor names"
        self.out_dir = Path(out_dir)
        self.metadata = {"format": "pt", **metadata}  # transformers expects format=pt
        self.shards = assign_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.shard_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (shard, offset, spec)
        self._files = []
        for shard_idx, (shard, fname) in enumerate(zip(self.shards, self.shard_names)):
            self._files.append(self._open_shard(shard_idx, shard, fname))
        self._pending = set(names)

    def _open_shard(self, shard_idx: int, shard: list[TensorSpec], fname: str):
        header, offset = {}, 0
        for spec in shard:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data region to 8 bytes, as safetensors does
        data_start = 8 + len(blob)
        for spec in shard:
            self._where[spec.name] = (shard_idx, data_start + header[spec.name]["data_offsets"][0],
                                      spec)
        f = open(self.out_dir / fname, "wb")
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(data_start + offset)  # full size now, so out-of-order writes leave no holes
        return f

    def write(self, name: str, tensor: torch.Tensor):
        assert name in self._pending, f"tensor {name!r} not planned or written twice"
        shard_idx, offset, spec = self._where[name]
        assert tuple(tensor.shape) == spec.shape and DTYPE_CODES[tensor.dtype] == spec.dtype, (
            f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {spec}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        f = self._files[shard_idx]
        f.seek(offset)
        f.write(memoryview(data))
        self._pending.discard(name)

    def close(self) -> dict:
        """Close the shards and write the index; every planned tensor must have been written."""
        assert not self._pending, f"tensors planned but never written: {sorted(self._pending)[:5]}"
        for f in self._files:
            f.close()
        weight_map = {s.name: fname for shard, fname in zip(self.shards, self.shard_names)
                      for s in shard}
        index = {"metadata": {"total_size": sum(s.nbytes for sh in self.shards for s in sh),
                              **{k: v for k, v in self.metadata.items() if k != "format"}},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return index

    def abort(self):
        for f in self._files:
            f.close()


def copy_side_files(src_dir: Path, dst_dir: Path, skip: Iterable[str]) -> list[str]:
    """Copy tokenizer and generation files: every regular file that is not a weight or skipped."""
    import shutil

    skip = set(skip)
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        if (not path.is_file() or path.name in skip or path.suffix in (".safetensors", ".bin", ".pt",
                                                                       ".pth")
                or path.name.endswith(".index.json")):
            continue
        shutil.copy2(path, dst_dir / path.name)
        copied.append(path.name)
    return copied
