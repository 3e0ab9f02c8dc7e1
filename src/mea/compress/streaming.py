"""Compression of checkpoints larger than memory (`mea compress --stream`): one decoder layer at a time.

The calibration windows are embedded (only the embedding rows of their tokens are read), then for each layer:
read its weights from the safetensors shards, push the calibration hidden states through it (accumulating the
input moments on the way), factor its attention, write the compressed layer as its own shard, free it. The
embeddings, final norm and LM head are copied into the output in row chunks. Peak memory is about one layer
+ the calibration hidden states (N x T x C) + the (C+1)^2 moments, whatever the model's size
(docs/large-models.md gives the formula). The output equals the in-memory path's (`compress` with
--recover none): the same calibration, the same factorisation, layer by layer.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import TOKENIZER_FILES, verify_checksums, write_checksums
from ..models.modeling_mea import decoder_layer
from ..ops import rope_cos_sin, rope_inv_freq
from .calibrate import add_input_moment, add_key_sums, key_moment
from .factor_model import compressed_config, factor_attention, keeps_layer, layer_target
from .methods import method_of

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
CALIBRATION_BATCH = 4  # windows per forward: as `calibrate.input_moments`, so that the sums agree exactly
COPY_CHUNK_BYTES = 64 * 2**20  # embeddings and LM head are copied in chunks of rows of about this size


class Shards:
    """The tensors of a safetensors checkpoint directory (one file or an index of shards), read on demand:
    a file is opened for each read and closed after it, so that no mapping keeps its pages resident."""

    def __init__(self, path: str | Path):
        from safetensors import SafetensorError

        path = Path(path)
        try:
            self.files, self.shapes = self._headers(path)
        except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"could not load the model in {path}: {type(e).__name__}: {e}; its safetensors files "
                             "are damaged or incomplete (copy or convert the checkpoint again)") from e

    @staticmethod
    def _headers(path: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
        """(the file of every tensor, the shape of every tensor), from the index and the files' headers."""
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = {name: path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif (path / "model.safetensors").is_file():
            with safe_open(path / "model.safetensors", "pt") as f:
                files = dict.fromkeys(f.keys(), path / "model.safetensors")
        else:
            raise ValueError(f"{path} has no model.safetensors(.index.json): --stream reads safetensors checkpoints")
        shapes: dict[str, tuple[int, ...]] = {}
        for file in set(files.values()):
            with safe_open(file, "pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        return files, shapes

    def bytes(self, element_size: int) -> int:
        """The size of all tensors at `element_size` bytes per value."""
        return sum(element_size * int(torch.Size(s).numel()) for s in self.shapes.values())

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for file in {self.files[n] for n in names}:
            with safe_open(file, "pt") as f:
                out.update({n: f.get_tensor(n) for n in names if self.files[n] == file})
        return out

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        with safe_open(self.files[name], "pt") as f:
            return f.get_slice(name)[start:stop]

    def gather_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (any shape) of a 2D tensor, reading only those rows: (*index.shape, columns)."""
        unique, inverse = torch.unique(index, return_inverse=True)
        with safe_open(self.files[name], "pt") as f:
            table = f.get_slice(name)
            picked = torch.cat([table[i : i + 1] for i in unique.tolist()])
        return picked[inverse]


def write_streamed(path: Path, names: list[str], shards: Shards, dtype: torch.dtype, rename) -> dict[str, str]:
    """Copy the tensors `names` of `shards` into one safetensors file at `path` in `dtype`, a chunk of rows at a
    time; `rename(name)` is each tensor's name there. Returns {new name: file name}."""
    header, offset = {}, 0
    size = torch.tensor([], dtype=dtype).element_size()
    for name in names:
        n = size * int(torch.Size(shards.shapes[name]).numel())
        header[rename(name)] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shards.shapes[name]),
                                "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            shape = shards.shapes[name]
            row_bytes = size * int(torch.Size(shape[1:]).numel())
            step = max(1, COPY_CHUNK_BYTES // max(1, row_bytes))
            for start in range(0, max(1, shape[0] if shape else 1), step):
                chunk = (shards.rows(name, start, start + step) if shape else shards.load([name])[name])
                f.write(chunk.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return {rename(name): path.name for name in names}


def check_streamable(opts) -> None:
    """What --stream does not do, named before any work."""
    if opts.virtual_heads is None:
        raise ValueError("--stream compresses with --virtual-heads N; a --kv-budget plan measures the whole "
                         "model's sensitivity (in memory)")
    if opts.recover != "none":
        raise ValueError("--stream writes each layer as soon as it is factored: add --recover none (then recover "
                         "the written model with `mea recover`)")


@torch.no_grad()
def compress_streamed(path: Path, tmp: Path, opts, config, plan: list[int], *, device: torch.device,
                      dtype: torch.dtype, windows: torch.Tensor, log=print) -> dict:
    """Write the compressed model of the checkpoint directory `path` (config: its `MEAConfig`) into `tmp`,
    layer by layer. Returns the per-layer factorisation report and the output's config."""
    from ..convert.hf_to_mea import map_weight_name

    verify_checksums(path, fix="copy the checkpoint again")
    shards = Shards(path)
    ours = {n if config.model_type == "mea" else map_weight_name(n): n for n in shards.files}  # our name -> theirs
    spec = method_of(opts.method)
    h, d = config.num_key_value_heads, config.head_dim
    targets = [layer_target(t, spec, d) for t in plan]
    inv_freq, rope_scaling = rope_inv_freq(config.rope_parameters or {}, d, config.max_position_embeddings)
    t = windows.shape[1]
    positions = torch.arange(t, device=device)[None].expand(CALIBRATION_BATCH, t)
    cos, sin = rope_cos_sin(inv_freq.to(device), positions, rope_scaling, dtype)
    x = shards.gather_rows(ours["model.embed_tokens.weight"], windows).to(device, dtype)  # (N, T, C)
    batches = [slice(j, j + CALIBRATION_BATCH) for j in range(0, len(x), CALIBRATION_BATCH)]
    weight_map, report = {}, []
    for i, target in enumerate(targets):
        prefix = f"model.layers.{i}."
        mine = {name.removeprefix(prefix): src for name, src in ours.items() if name.startswith(prefix)}
        layer = decoder_layer(config, i)
        loaded = shards.load(list(mine.values()))
        missing, unexpected = layer.load_state_dict({k: loaded[src] for k, src in mine.items()}, strict=False)
        if unexpected or any(".hlc_" not in f".{k}" for k in missing):
            raise ValueError(f"layer {i} of {path} does not fit its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        layer = layer.to(device, dtype).eval()
        attn = layer.self_attn
        sigma = torch.zeros(config.hidden_size + 1, config.hidden_size + 1, dtype=torch.float64)
        key_sums = None
        for b in batches:  # the attention inputs of the calibration windows, as `calibrate` sees them
            a = layer.input_layernorm(x[b])
            add_input_moment(sigma, a)
            if attn.k_norm is not None and spec.weighted:
                key_sums = add_key_sums(key_sums, attn, a)
        state = layer.state_dict()
        if not keeps_layer(target, spec, h, d):
            new, row = factor_attention(attn, target, method=opts.method, sigma=sigma if spec.weighted else None,
                                        key_stats=key_moment(key_sums), key_weighting=opts.key_weighting,
                                        value_weighting=opts.value_weighting)
            state = {**{k: v for k, v in state.items() if not k.startswith("self_attn.")},
                     **{f"self_attn.{k}": v for k, v in new.state_dict().items()}}
            report.append({"layer": i, **row})
            log(f"layer {i:2d}: factored to {target} (k error {row['k_rel_error']:.4f}, "
                f"v error {row['v_rel_error']:.4f})")
        for b in batches:  # the original layer's outputs: the next layer's calibration inputs
            x[b] = layer(x[b], cos[: len(x[b])], sin[: len(x[b])])
        file = tmp / f"model-layer-{i:05d}.safetensors"
        save_file({prefix + k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, file)
        weight_map.update(dict.fromkeys((prefix + k for k in state), file.name))
        del layer, attn, state, loaded
    rest = [name for name in ours if not name.startswith("model.layers.")]
    back = {src: name for name, src in ours.items()}
    weight_map.update(write_streamed(tmp / "model-embeddings.safetensors", [ours[n] for n in rest], shards, dtype,
                                     back.__getitem__))
    total = sum(v.stat().st_size for v in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    new_cfg = compressed_config(config, targets, spec)
    new_cfg.dtype = dtype
    new_cfg.save_pretrained(tmp)
    return {"factor_report": report, "config": new_cfg}


def copy_tokenizer_files(path: Path, tmp: Path) -> None:
    import shutil

    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            shutil.copy2(path / name, tmp / name)


def finish(tmp: Path, provenance: dict) -> None:
    """The provenance and the checksums of the weights: the last files of the output."""
    (tmp / "mea_provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    write_checksums(tmp)
