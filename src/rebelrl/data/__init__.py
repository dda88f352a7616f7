"""Reading prompts, preference pairs and demonstrations from files and datasets, with errors that
name the file, row and field."""

from rebelrl.data.preferences import (
    DemonstrationDataError,
    PreferenceDataError,
    check_demonstration_lengths,
    check_pair_lengths,
    load_demonstration_rows,
    load_preference_rows,
)
from rebelrl.data.prompts import PromptDataError, load_prompt_rows, load_prompts

__all__ = [
    "DemonstrationDataError",
    "PreferenceDataError",
    "PromptDataError",
    "check_demonstration_lengths",
    "check_pair_lengths",
    "load_demonstration_rows",
    "load_preference_rows",
    "load_prompt_rows",
    "load_prompts",
]
