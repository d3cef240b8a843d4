"""The kubelet's part of the agent contract: project a pod's annotations into its file.

The test control plane has no kubelet, so tests and the demo play it: the file
holds ``key="value"`` lines sorted by key, each value quoted as Go's ``%q``
quotes it (``fieldpath.FormatMap``), and a change replaces the file with a new
one (the kubelet's atomic writer swaps a symlink; a rename is the same to a
reader: a new inode, never a half-written file).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            "\v": "\\v", "\\": "\\\\", '"': '\\"'}


def go_quote(value: str) -> str:
    """``value`` as Go's ``%q`` writes it (printable characters kept as UTF-8)."""
    out = ['"']
    for c in value:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        elif c == " " or c.isprintable():
            out.append(c)
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    out.append('"')
    return "".join(out)


def render(annotations: Mapping[str, str]) -> str:
    """The file's text for these annotations."""
    return "\n".join(f"{k}={go_quote(v)}" for k, v in sorted(annotations.items()))


def project(annotations: Mapping[str, str], path: Path) -> bool:
    """Write the file if its text would change (as the kubelet does); True if written."""
    text = render(annotations)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    new = path.with_name(f".{path.name}.new")
    new.write_text(text, encoding="utf-8")
    os.replace(new, path)
    return True
