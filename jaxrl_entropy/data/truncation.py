"""What a run does with prompts longer than `data.max_prompt_len` (config `data.truncation`). A
module of its own, with no imports, so that the config schema can name the modes without
importing the data pipeline (grain: over a second, and it configures the root logger)."""
from __future__ import annotations

TRUNCATION_MODES = ("error", "drop", "left")


def encoder_truncation(truncation: str) -> str:
    """The `PromptEncoder` mode for records that went through `fit_prompt_lengths(truncation)`:
    it left-truncates only under "left"; otherwise nothing is too long any more, and a prompt that
    were would be an error, never a silent cut."""
    return "left" if truncation == "left" else "error"
