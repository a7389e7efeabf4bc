"""How ``dynamask COMMAND --help`` shows each flag: its help text and its default.

argparse's ``ArgumentDefaultsHelpFormatter`` appends ``(default: X)`` to every help text; this one does it
in the words a reader needs: a flag's help that already says its default is left as it is (``None`` often
means "the model's own", which only the text can say), a switch (a flag that takes no value) is off unless
given and shows nothing more, ``None`` reads "none" and a list reads as it is typed (``8 11``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def shown(value: Any) -> str:
    """A default as a user would type it."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every value-taking flag's default (see the module's docstring)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or not takes_value(action) or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        # the help text is %-formatted by argparse: a literal % in a default must be doubled
        return f"{text} (default: {shown(action.default).replace('%', '%%')})"
