"""Rewrite the README's config reference table from the config's field docs."""

import os
import re

from normexp.config import reference_markdown

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

text = open(README).read()
text = re.sub(r"(<!-- config-reference:start[^>]*-->\n).*?(<!-- config-reference:end -->)",
              lambda m: m.group(1) + reference_markdown() + m.group(2), text, flags=re.S)
open(README, "w").write(text)
