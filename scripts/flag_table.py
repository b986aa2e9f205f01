"""Print the README's flag reference table from train_aria_distill.py's argparse definitions."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_aria_distill import build_parser  # noqa: E402


def flag_rows():
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = max(action.option_strings, key=len)
        default = "" if action.default is None or action.default is False else f"`{action.default}`"  # 0 is a value
        choices = f" ({', '.join(map(str, action.choices))})" if action.choices else ""
        help_text = (action.help or "").replace("|", "\\|")
        yield f"| `{flag}` | {default} | {help_text}{choices} |"


if __name__ == "__main__":
    print("| flag | default | meaning |\n|---|---|---|")
    print("\n".join(flag_rows()))
