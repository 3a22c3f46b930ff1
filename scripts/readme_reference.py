"""The README's config reference table, generated from the config's field docs.

`python scripts/readme_reference.py` rewrites the table in README.md; the tests check it is
current.
"""

import dataclasses
import json
import os
import re
import typing

from normexp.config import Config

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def reference(cls=Config, prefix=""):
    """(dotted key, default, doc) for every field: the README's config reference."""
    rows = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            rows += reference(kind, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, f.default, f.metadata["doc"]))
    return rows


def reference_markdown():
    """The README's config reference table, generated from the field docs."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, doc in reference():
        shown = repr(default) if isinstance(default, float) else json.dumps(default)
        rows.append(f"| `{key}` | `{shown}` | {doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    text = open(README).read()
    text = re.sub(r"(<!-- config-reference:start[^>]*-->\n).*?(<!-- config-reference:end -->)",
                  lambda m: m.group(1) + reference_markdown() + m.group(2), text, flags=re.S)
    open(README, "w").write(text)
