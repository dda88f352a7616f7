"""Reading prompt data from files and datasets, with errors that name the file, row and field."""

from rebelrl.data.prompts import PromptDataError, load_prompt_rows, load_prompts

__all__ = ["PromptDataError", "load_prompt_rows", "load_prompts"]
