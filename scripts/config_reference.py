"""The config reference of every command as Markdown; `--write README.md` refreshes the README's copy."""

import re
import sys
from pathlib import Path

from rebelrl.cli import COMMANDS
from rebelrl.config import markdown_reference

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def reference() -> str:
    return "\n".join(f"#### `rebelrl {name}`\n\n{markdown_reference(cls)}\n" for name, cls in COMMANDS.items())


def embed(readme: str) -> str:
    block = f"{START}\n{reference()}{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        path = Path(sys.argv[2])
        path.write_text(embed(path.read_text()))
    else:
        print(reference())
