"""Reading Hugging Face config files, the user's and the bundled ones, into models.ModelArch.

models.py holds the architecture and its arithmetic and forwards parse_hf_config here. This
module does the file work: typed key access whose errors name the json key as the user sees it
("text_config.hidden_size") and the mapping of config keys onto the architecture. The
checkpoint's own quantization is read by hf_quant.py; the bundled catalog in data/models/ (ids,
aliases, variants and provenance in index.json) is bundled.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trilemma.optimizer.catalog import models
from trilemma.optimizer.catalog.hf_quant import checkpoint_quant
from trilemma.optimizer.errors import InputError

Kind = models.AttentionKind
QUANT_COMPANION = "hf_quant_config.json"


def read_json(source: str | os.PathLike[str], field: str = "config") -> dict[str, Any]:
    """The JSON object in a file; a missing file or invalid JSON is the user's input error."""
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(field, os.fspath(source), f"cannot read it ({exc.strerror})") from exc
    return loads(text, field, os.fspath(source))


def loads(text: str, field: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(field, where, f"not valid JSON (line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg})") from exc
    if not isinstance(data, dict):
        raise InputError(field, where, "must hold a JSON object, not " + type(data).__name__)
    return data


def quant_companion(config_path: Path) -> Path | None:
    """ModelOpt's hf_quant_config.json beside a config, in the three spellings in use:
    `config.json` + `hf_quant_config.json`, `X_config.json` + `X_hf_quant_config.json`, and the
    bundled `X.json` + `X.hf_quant_config.json`."""
    name = config_path.name
    if name == "config.json" or name.endswith("_config.json"):
        companion = config_path.with_name(name.removesuffix("config.json") + QUANT_COMPANION)
    else:
        companion = config_path.with_name(config_path.stem + "." + QUANT_COMPANION)
    return companion if companion.is_file() else None


def model_id_from_path(config_path: Path) -> str:
    """`org--name_config.json` -> "org/name"; `.../name/config.json` -> "name"."""
    if config_path.name == "config.json":
        return config_path.resolve().parent.name
    name = config_path.name.removesuffix(".json").removesuffix("_config").removesuffix(".config")
    return name.replace("--", "/")


class ConfigReader:
    """Typed access to one config mapping; errors name the key with its parent ("text_config.x")."""

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self.data, self.prefix = data, prefix

    def key(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def get(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name)
        return default if value is None else value

    def get_int(self, name: str, default: int | None = None, *, minimum: int = 1) -> int:
        """An integer key, required unless `default` is given; below `minimum` is an error."""
        value = self.data.get(name)
        if value is None:
            if default is None:
                raise InputError(self.key(name), None, "missing from the config")
            return default
        # JSON writers sometimes emit 4096.0; a whole float is the same size, a fraction is not.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(self.key(name), value, "must be an integer")
        if value < minimum:
            raise InputError(self.key(name), value, f"must be an integer >= {minimum}")
        return value

    def first_int(self, names: tuple[str, ...], default: int | None = None, minimum: int = 1
                  ) -> int:
        """The first spelling present: families name the same quantity differently."""
        present = next((n for n in names if self.has(n)), None)
        if present is None and default is not None:
            return default
        return self.get_int(present or names[0], minimum=minimum)

    def get_bool(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise InputError(self.key(name), value, "must be true or false")
        return value

    def get_list(self, name: str) -> list[Any] | None:
        value = self.data.get(name)
        if value is not None and not isinstance(value, list):
            raise InputError(self.key(name), value, "must be a list")
        return value


# --- parsing a config -------------------------------------------------------------------------

# Families whose FFN is up -> activation -> down (two matrices) rather than gated (three).
_PLAIN_MLP = frozenset({"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon",
                        "phi", "starcoder2", "mpt"})
# Families with learned per-head RMSNorm on q and k whether or not the config says so.
_QK_NORM = frozenset({"qwen3", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text", "gemma3_text",
                      "gemma4_text", "olmo2"})
_QKV_BIAS = frozenset({"qwen2", "qwen2_moe"})  # biases on q, k, v but not o, by definition


def parse_hf_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    model_id: str | None = None,
    *,
    hf_quant_config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> models.ModelArch:
    """See models.parse_hf_config."""
    if isinstance(hf_quant_config, Mapping) or hf_quant_config is None:
        quant = hf_quant_config
    else:
        quant = read_json(hf_quant_config, "hf_quant_config")
    if isinstance(source, Mapping):
        return build(source, model_id or "custom", quant, "a config mapping")
    path = Path(source).expanduser()
    path = path / "config.json" if path.is_dir() else path  # a downloaded repository folder
    raw = read_json(path)
    companion = quant_companion(path) if quant is None else None
    if companion is not None:
        quant = read_json(companion, "hf_quant_config")
    return build(raw, model_id or model_id_from_path(path), quant, str(path))


def build(
    raw: Mapping[str, Any], model_id: str, quant: Mapping[str, Any] | None, origin: str
) -> models.ModelArch:
    """The architecture of a parsed config.json and its ModelOpt companion (None when there is
    none); `origin` says where they came from, for the arch's source."""
    top = ConfigReader(raw)
    nested = raw.get("text_config")
    if nested is not None and not isinstance(nested, Mapping):
        raise InputError("text_config", nested, "must be a JSON object")
    cfg = ConfigReader(nested, "text_config.") if nested else top
    model_type = str(cfg.get("model_type") or top.get("model_type") or "unknown")
    layers = cfg.get_int("num_hidden_layers")
    hidden = cfg.get_int("hidden_size")
    heads = cfg.get_int("num_attention_heads")
    kv_heads = cfg.get_int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise InputError(cfg.key("num_key_value_heads"), kv_heads,
                         f"must divide num_attention_heads={heads}")
    mla = _parse_mla(cfg)
    if mla is not None:
        head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim  # the query-key width per head
    elif cfg.has("head_dim"):
        head_dim = cfg.get_int("head_dim")
    elif hidden % heads:
        raise InputError(cfg.key("head_dim"), None,
                         f"missing, and hidden_size={hidden} is not a multiple of {heads} heads")
    else:
        head_dim = hidden // heads
    moe = _parse_moe(cfg, model_type, layers)
    kinds, window = _attention_kinds(cfg, model_type, layers)
    recipe, kv_quant, unquantized = _checkpoint_quant(top, cfg, quant)
    k_eq_v = cfg.get_bool("attention_k_eq_v", False)
    architectures = top.get_list("architectures") or cfg.get_list("architectures") or [model_type]
    # The outer model owns lm_head, so its tie flag wins; Gemma is the family that ties by default.
    tied_default = cfg.get_bool("tie_word_embeddings", model_type.startswith("gemma"))
    return models.ModelArch(
        id=model_id,
        family=_family(model_type, cfg.get_int("vocab_size")),
        architecture=str(architectures[0]),
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=moe.dense_intermediate_size if moe else cfg.get_int("intermediate_size"),
        vocab_size=cfg.get_int("vocab_size"),
        tie_word_embeddings=top.get_bool("tie_word_embeddings", tied_default),
        moe=moe,
        mla=mla,
        sliding_window=window,
        sliding_layers=sum(k.windowed for k in kinds),
        gated_mlp=model_type not in _PLAIN_MLP,
        attention_bias=(cfg.get_bool("attention_bias", False) or cfg.get_bool("qkv_bias", False)
                        or model_type in _QKV_BIAS),
        o_proj_bias=cfg.get_bool("attention_bias", False) and model_type not in _QKV_BIAS,
        mlp_bias=cfg.get_bool("mlp_bias", False) or model_type == "gpt_oss",
        # Llama-4's use_qk_norm is a weightless L2 norm: no parameters to count.
        qk_norm=model_type in _QK_NORM
        or (cfg.get_bool("use_qk_norm", False) and model_type != "llama4_text"),
        qk_norm_spans_heads=cfg.get("qk_norm_type") == "per_layer",
        attention_sinks=model_type == "gpt_oss",
        attention_output_gate=cfg.get_bool("attn_output_gate", False),
        k_eq_v=k_eq_v,
        full_attention_head_dim=cfg.get_int("global_head_dim") if cfg.has("global_head_dim")
        else None,
        full_attention_kv_heads=cfg.get_int("num_global_key_value_heads")
        if k_eq_v and cfg.has("num_global_key_value_heads") else None,
        attention_kinds=kinds,
        linear_attention=_parse_linear(cfg) if Kind.LINEAR in kinds else None,
        indexer=_parse_indexer(cfg) if cfg.has("index_topk") else None,
        nextn_layers=_nextn_layers(cfg),
        checkpoint_quant=recipe,
        checkpoint_kv_quant=kv_quant,
        unquantized_parts=unquantized,
        max_position_embeddings=cfg.first_int(
            ("max_position_embeddings", "max_sequence_length", "seq_length")),
        multimodal=top.has("vision_config"),
        source=origin,
    )


def _family(model_type: str, vocab_size: int) -> str:
    family = model_type.removesuffix("_text")
    # model_type "llama" spans Llama 1-3; the 128,256-token vocabulary marks Llama 3.x.
    return "llama3" if family == "llama" and vocab_size == 128256 else family


def _parse_mla(cfg: ConfigReader) -> models.MLA | None:
    if not cfg.has("kv_lora_rank"):
        return None
    return models.MLA(
        q_lora_rank=cfg.get_int("q_lora_rank") if cfg.has("q_lora_rank") else None,
        kv_lora_rank=cfg.get_int("kv_lora_rank"),
        qk_rope_head_dim=cfg.get_int("qk_rope_head_dim"),
        qk_nope_head_dim=cfg.get_int("qk_nope_head_dim"),
        v_head_dim=cfg.get_int("v_head_dim"),
    )


def _parse_moe(cfg: ConfigReader, model_type: str, layers: int) -> models.MoE | None:
    experts = cfg.first_int(("n_routed_experts", "num_local_experts", "num_experts"), 0, 0)
    if experts == 0:
        return None
    top_k = cfg.first_int(("num_experts_per_tok", "experts_per_token", "top_k_experts"))
    if top_k > experts:
        raise InputError(cfg.key("num_experts_per_tok"), top_k, f"exceeds {experts} experts")
    expert_width = cfg.first_int(("moe_intermediate_size", "intermediate_size"))
    dense_width = cfg.first_int(("intermediate_size_mlp", "intermediate_size"), 0, 0)
    shared, shared_width = 0, 0
    if cfg.has("n_shared_experts"):  # DeepSeek family: shared experts as wide as routed ones
        shared, shared_width = cfg.get_int("n_shared_experts", minimum=0), expert_width
    elif cfg.get("shared_expert_intermediate_size", 0):  # Qwen-MoE: one shared expert
        shared, shared_width = 1, cfg.get_int("shared_expert_intermediate_size")
    elif model_type == "llama4_text":  # one shared expert per MoE layer, as wide as the experts
        shared, shared_width = 1, expert_width
    elif cfg.get_bool("enable_moe_block", False):
        # Gemma-4 runs its dense MLP beside the experts in every layer: a shared expert.
        shared, shared_width, dense_width = 1, dense_width, 0
    first_dense = cfg.get_int("first_k_dense_replace", 0, minimum=0)
    mlp_only = cfg.get_list("mlp_only_layers") or []
    if mlp_only:
        if mlp_only != list(range(len(mlp_only))):
            raise InputError(cfg.key("mlp_only_layers"), mlp_only,
                             "only a leading run of dense layers is modelled")
        first_dense = len(mlp_only)
    interval = cfg.first_int(("decoder_sparse_step", "interleave_moe_layer_step"), 1)
    if cfg.get_int("moe_layer_freq", 1) != 1:
        raise InputError(cfg.key("moe_layer_freq"), cfg.get("moe_layer_freq"),
                         "only 1 (every layer after first_k_dense_replace) is modelled")
    moe = models.MoE(
        num_experts=experts,
        experts_per_token=top_k,
        expert_intermediate_size=expert_width,
        shared_experts=shared,
        shared_expert_intermediate_size=shared_width,
        first_dense_layers=min(first_dense, layers),
        dense_intermediate_size=dense_width if first_dense or interval > 1 else 0,
        moe_layer_interval=interval,
        router_bias=(model_type == "gpt_oss" or cfg.get("topk_method") == "noaux_tc"
                     or cfg.get_bool("use_routing_bias", False)),
    )
    explicit = cfg.get_list("moe_layers")
    if explicit is not None and explicit != [i for i in range(layers) if moe.is_moe_layer(i)]:
        raise InputError(cfg.key("moe_layers"), explicit, "only a regular interleave is modelled")
    if moe.dense_intermediate_size == 0 and (first_dense or interval > 1):
        raise InputError(cfg.key("intermediate_size"), None, "dense layers need their width")
    return moe


def _attention_kinds(
    cfg: ConfigReader, model_type: str, layers: int
) -> tuple[tuple[Kind, ...], int | None]:
    """Per-layer attention kinds (empty: all full) and the window of the windowed ones."""
    types = cfg.get_list("layer_types")
    if types is not None:
        if len(types) != layers:
            raise InputError(cfg.key("layer_types"), len(types),
                             f"must list num_hidden_layers={layers} entries")
        known = {k.value: k for k in Kind}
        for entry in types:
            if entry not in known:
                raise InputError(cfg.key("layer_types"), entry, f"unknown; known: {sorted(known)}")
        kinds = tuple(known[t] for t in types)
        windowed = any(k.windowed for k in kinds)
        return kinds, cfg.get_int("sliding_window") if windowed else None
    if cfg.has("attention_chunk_size"):
        # Llama-4: RoPE layers attend within chunks; every no_rope_layer_interval-th is global.
        chunk = cfg.get_int("attention_chunk_size")
        rope = cfg.get_list("no_rope_layers") or [
            int((i + 1) % cfg.get_int("no_rope_layer_interval", 4) != 0) for i in range(layers)]
        if len(rope) != layers:
            raise InputError(cfg.key("no_rope_layers"), len(rope), f"must list {layers} layers")
        return tuple(Kind.CHUNKED if r else Kind.FULL for r in rope), chunk
    if not cfg.has("sliding_window") or not cfg.get_bool("use_sliding_window", True):
        return (), None
    window = cfg.get_int("sliding_window")
    if model_type.startswith("qwen") and cfg.has("max_window_layers"):
        first = cfg.get_int("max_window_layers", minimum=0)  # Qwen2: layers from here slide
        sliding = [i >= first for i in range(layers)]
    elif cfg.has("sliding_window_pattern"):  # Gemma-3: every n-th layer is global
        period = cfg.get_int("sliding_window_pattern")
        sliding = [(i + 1) % period != 0 for i in range(layers)]
    elif model_type == "gemma2":
        sliding = [i % 2 == 0 for i in range(layers)]
    else:  # Mistral-7B style: every layer slides
        sliding = [True] * layers
    kinds = tuple(Kind.SLIDING if s else Kind.FULL for s in sliding)
    return kinds, window if any(sliding) else None


def _parse_linear(cfg: ConfigReader) -> models.LinearAttention:
    return models.LinearAttention(
        num_key_heads=cfg.get_int("linear_num_key_heads"),
        num_value_heads=cfg.get_int("linear_num_value_heads"),
        key_head_dim=cfg.get_int("linear_key_head_dim"),
        value_head_dim=cfg.get_int("linear_value_head_dim"),
        conv_kernel=cfg.get_int("linear_conv_kernel_dim"),
        state_bytes_per_elem=4.0 if cfg.get("mamba_ssm_dtype", "float32") == "float32" else 2.0,
    )


def _parse_indexer(cfg: ConfigReader) -> models.SparseIndexer:
    return models.SparseIndexer(num_heads=cfg.get_int("index_n_heads"),
                                head_dim=cfg.get_int("index_head_dim"),
                                topk=cfg.get_int("index_topk"))


def _nextn_layers(cfg: ConfigReader) -> int:
    if cfg.get_bool("use_mtp", False):  # MiniMax: several MTP modules of a few layers each
        return cfg.get_int("num_mtp_modules", 1) * cfg.get_int("mtp_transformer_layers", 1)
    return cfg.first_int(("num_nextn_predict_layers", "mtp_num_hidden_layers"), 0, 0)


def _checkpoint_quant(
    top: ConfigReader, cfg: ConfigReader, quant: Mapping[str, Any] | None
) -> tuple[str | None, str | None, frozenset[str]]:
    reader = cfg if cfg.has("quantization_config") else top
    qcfg = reader.get("quantization_config")
    if qcfg is not None and not isinstance(qcfg, Mapping):
        raise InputError(reader.key("quantization_config"), qcfg, "must be a JSON object")
    return checkpoint_quant(qcfg, quant, reader.key("quantization_config"))
