"""Qwen3 architecture config: parsed from (and written back to) a HF `config.json`.

Only what changes the maths is kept. Fields of a HF config that would change the maths in a way
this port does not implement (rope scaling, sliding windows, another activation) are rejected
with an error naming the field, instead of silently computing something else.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

# The dtype names a config may give for compute (`model.dtype`) and storage (`model.param_dtype`).
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


class CheckpointError(ValueError):
    """A HF checkpoint directory that cannot be read as a Qwen3: says which file and field."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"Qwen3 config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ------------------------------------------------------------------ HF interchange
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "Qwen3Config":
        """Validate a HF Qwen3 config dict (transformers 4.x or 5.x layout)."""
        where = f"{source}"
        model_type = d.get("model_type")
        if model_type not in (None, "qwen3"):
            raise CheckpointError(
                f"{where}: model_type is {model_type!r}; this port implements 'qwen3' "
                "(Qwen3ForCausalLM). MoE ('qwen3_moe') and other families are not supported.")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{where}: hidden_act={act!r} is not supported (Qwen3 uses 'silu')")
        if d.get("use_sliding_window"):
            raise CheckpointError(
                f"{where}: use_sliding_window=true is not supported; set it to false "
                "(Qwen3 checkpoints ship with full attention in every layer)")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise CheckpointError(f"{where}: layer_types {sorted(set(layer_types))} not supported; only 'full_attention'")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling")
        rope_type = (rope.get("rope_type") or rope.get("type") or "default") if rope else "default"
        if scaling:
            rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise CheckpointError(
                f"{where}: rope scaling {rope_type!r} is not supported (only the default RoPE); "
                "remove 'rope_scaling' / set rope_parameters.rope_type to 'default'")
        theta = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise CheckpointError(f"{where}: missing required field(s) {missing}")
        heads = d["num_attention_heads"]
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
            )
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str) -> "Qwen3Config":
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: file not found; a HF checkpoint directory needs a config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self, *, torch_dtype: str = "float32") -> dict[str, Any]:
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }


def read_hf_config(hf_dir: str) -> Qwen3Config:
    """The architecture of a local HF Qwen3 directory, from its `config.json` alone.

    No weight file is opened, so a directory holding only `config.json` works (dry runs, memory
    plans). The checks are those of loading: unsupported rope scaling, sliding windows, MoE or
    another activation raise `CheckpointError` naming the file and the field.
    """
    hf_dir = os.fspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: not a directory; pass a local HF checkpoint directory "
                              "(config.json + *.safetensors). Nothing is downloaded from a hub.")
    return Qwen3Config.from_json_file(os.path.join(hf_dir, "config.json"))
