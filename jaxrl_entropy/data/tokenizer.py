"""Tokenizers: a tiny character-level demo tokenizer, and loading a real one from a directory.

The demo tokenizer is built in memory with the `tokenizers` library (nothing is downloaded) and
wrapped as a `transformers` fast tokenizer with Qwen3-style special tokens and a Qwen-like chat
template, so the synthetic CPU demo goes through exactly the code path of a real checkpoint
(`apply_chat_template` → ids → sampler → `decode`).
"""

from __future__ import annotations

import os

import tokenizers
from tokenizers import decoders, models
import transformers

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, UNK_TOKEN)

# Printable ASCII (space .. '~') covers digits, operators, parentheses, both letter cases and the
# `\boxed{}` markup; newline and tab complete it. Order is fixed, so ids never change.
DEMO_CHARACTERS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")

# Qwen-like template without the system-prompt and tool branches real Qwen3 has: the demo
# needs only user/assistant turns, and the generation prompt must end exactly at "assistant\n".
QWEN_LIKE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Files `from_pretrained` needs: the fast-tokenizer file, or a slow-tokenizer vocabulary.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def build_demo_tokenizer(model_max_length: int = 4096) -> transformers.PreTrainedTokenizerFast:
    """Character-level tokenizer for the synthetic arithmetic task (vocabulary of 101 ids).

    Ids: 0 `<|endoftext|>` (pad), 1 `<|im_start|>`, 2 `<|im_end|>` (eos), 3 `<|unk|>`, then one id
    per character of `DEMO_CHARACTERS`. Characters outside that set map to `<|unk|>`.
    Padding side is left (prompts are left-padded for generation, as with real checkpoints).
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + DEMO_CHARACTERS)}
    # A BPE model with no merges and no pre-tokenizer splits any text into single characters.
    core = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    core.decoder = decoders.Fuse()  # join characters without inserting spaces
    core.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        chat_template=QWEN_LIKE_CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",
    )
    return tokenizer


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    """Loads a tokenizer from a local directory (a HF checkpoint or a saved demo tokenizer).

    Sets `padding_side="left"` (prompts are left-padded for generation) and guarantees a pad
    token: when the checkpoint has none, the eos token is used as pad.

    Raises:
      FileNotFoundError: the directory or its tokenizer files are missing.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Tokenizer directory {path!r} does not exist. Point the tokenizer path (config key "
            "`tokenizer`, or else `model.hf_dir`) at a local directory containing "
            f"one of {', '.join(_TOKENIZER_FILES)} (for example a HF checkpoint, or a directory "
            "written by `build_demo_tokenizer().save_pretrained(dir)`)."
        )
    present = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(path, f))]
    if not present:
        raise FileNotFoundError(
            f"No tokenizer files in {path!r}: expected one of {', '.join(_TOKENIZER_FILES)} "
            f"(found: {sorted(os.listdir(path))}). Copy the tokenizer files of the checkpoint "
            "into this directory, or save one with `tokenizer.save_pretrained(dir)`."
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, AttributeError) as err:
        # A directory saved by transformers 5 names the class `TokenizersBackend`, which 4.x does
        # not know; the generic fast tokenizer reads the same tokenizer.json.
        if "tokenizer.json" not in present:
            raise
        try:
            tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(
                path, local_files_only=True
            )
        except Exception:
            raise err from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"Tokenizer in {path!r} has neither a pad nor an eos token; add one to its "
                "tokenizer_config.json (`pad_token` or `eos_token`)."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
