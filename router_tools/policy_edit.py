"""Careful edits of a policy YAML file: change one scalar, keep everything else byte for byte.

A YAML round-trip through a parser would drop the operator's comments and layout, so the edit
is textual: find the one line ``key: value  # comment`` (a top-level key, or a key inside a
block mapping such as ``edge:``), replace the value, keep the indentation and the comment.
The result is parsed and validated as a policy before anything is written, and must read back
the value that was set; otherwise :class:`PolicyEditError` and the file is left alone.
Writes are atomic (temporary file + rename), so a router watching the file never reads half.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from router.errors import ConfigError

_KEY_LINE = re.compile(r"^(?P<indent>[ ]*)(?P<key>[A-Za-z_][A-Za-z0-9_]*)[ ]*:(?P<rest>.*)$")


class PolicyEditError(ConfigError):
    pass


def _split_comment(rest: str) -> tuple[str, str]:
    """``'  0.8   # note'`` -> (``'0.8'``, ``'   # note'``); a ``#`` inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            value = rest[:i].rstrip()
            return value.strip(), rest[len(value):]
    return rest.strip(), ""


def set_scalar(text: str, path: Sequence[str], value: str, *, source: str = "<policy>") -> str:
    """``text`` with the scalar at ``path`` (e.g. ``("confidence_threshold",)`` or
    ``("edge", "manifest")``) set to the YAML scalar text ``value``; the key is added when absent."""
    return _set_scalar(text, path, value, source)[0]


def _set_scalar(text: str, path: Sequence[str], value: str, source: str) -> tuple[str, int]:
    """:func:`set_scalar`, and the index of the line that now holds the key."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    start, end, indent = 0, len(lines), 0  # the block searched: lines[start:end] at this indentation
    for depth, key in enumerate(path):
        last = depth == len(path) - 1
        hits = []
        for i in range(start, end):
            m = _KEY_LINE.match(lines[i].rstrip("\r\n"))
            if m and len(m.group("indent")) == indent and m.group("key") == key:
                hits.append((i, m))
        dotted = ".".join(path[: depth + 1])
        if len(hits) > 1:
            raise PolicyEditError(f"{source}: {dotted} appears {len(hits)} times (lines {', '.join(str(i + 1) for i, _ in hits)})")
        if not hits:
            if last:
                new = f"{' ' * indent}{key}: {value}{newline}"
                if end > 0 and not lines[end - 1].endswith(("\n", "\r")):
                    lines[end - 1] += newline
                lines.insert(end, new)
                return "".join(lines), end
            # a missing parent block: append it with the rest of the path beneath
            block = "".join(f"{' ' * (indent + 2 * j)}{k}:{newline}" for j, k in enumerate(path[depth:-1]))
            block += f"{' ' * (indent + 2 * (len(path) - 1 - depth))}{path[-1]}: {value}{newline}"
            if end > 0 and not lines[end - 1].endswith(("\n", "\r")):
                lines[end - 1] += newline
            lines.insert(end, block)
            return "".join(lines), end + len(path) - 1 - depth
        i, m = hits[0]
        current, comment = _split_comment(m.group("rest"))
        if last:
            if current in ("", "|", ">") or current.startswith(("{", "[", "&", "*", "!")):
                raise PolicyEditError(f"{source}:{i + 1}: {dotted} is not a plain one-line value; edit it by hand")
            eol = newline if lines[i].endswith(("\n", "\r")) else ""
            lines[i] = f"{m.group('indent')}{key}: {value}{comment}{eol}"
            return "".join(lines), i
        if current not in ("", "null", "~"):
            raise PolicyEditError(f"{source}:{i + 1}: {dotted} is written inline ({current!r}); edit it by hand")
        # the child block: following lines indented deeper than this key (comments/blank lines inside)
        child_start, child_end, child_indent = i + 1, i + 1, None
        for j in range(i + 1, end):
            stripped = lines[j].strip()
            if not stripped or stripped.startswith("#"):
                continue
            ind = len(lines[j]) - len(lines[j].lstrip(" "))
            if ind <= indent:
                break
            child_indent = ind if child_indent is None else child_indent
            child_end = j + 1
        if current in ("null", "~"):
            lines[i] = f"{m.group('indent')}{key}:{comment}{newline}"
        start, end, indent = child_start, child_end, child_indent if child_indent is not None else indent + 2
    raise PolicyEditError(f"{source}: empty key path")  # pragma: no cover


_PROVENANCE = re.compile(r"^[ ]*#[ ]*chosen by\b", re.IGNORECASE)


def set_provenance(text: str, line: int, note: str) -> str:
    """``text`` with the ``# Chosen by ...`` comment directly above line ``line`` (among the comment
    lines that lead up to it) replaced by ``# note``, or that comment added just above the line.

    The operator's other comments stay; only the line that says where the value came from changes,
    so it cannot go on describing a value that is no longer there."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    indent = lines[line][: len(lines[line]) - len(lines[line].lstrip(" "))]
    new = f"{indent}# {' '.join(note.split())}{newline}"  # one line whatever the note holds
    i = line - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        if _PROVENANCE.match(lines[i]):
            lines[i] = new
            return "".join(lines)
        i -= 1
    lines.insert(line, new)
    return "".join(lines)


def edit_policy(text: str, changes: dict[tuple[str, ...], Any], *, source: str = "<policy>",
                notes: dict[tuple[str, ...], str] | None = None) -> str:
    """Apply ``{path: python value}`` to the policy text and check the result validates and reads back.

    ``notes`` (``{path: text}``) set the ``# Chosen by ...`` comment above a changed key
    (:func:`set_provenance`)."""
    from router.policy import parse_policy

    new = text
    for path, value in changes.items():
        new, line = _set_scalar(new, path, yaml_scalar(value), source)
        if notes and path in notes:
            new = set_provenance(new, line, notes[path])
    try:
        data = yaml.safe_load(new)
    except yaml.YAMLError as exc:
        raise PolicyEditError(f"{source}: the edit would make invalid YAML ({exc}); file left unchanged") from None
    policy = parse_policy(data, source)  # raises ConfigError naming the field
    for path, value in changes.items():
        got: Any = data
        for key in path:
            got = got.get(key) if isinstance(got, dict) else None
        if got != value:
            raise PolicyEditError(f"{source}: {'.'.join(path)} reads back as {got!r}, not {value!r}; file left unchanged")
    del policy
    return new


def yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "null"
    import json

    return json.dumps(str(value))  # a JSON string is a valid double-quoted YAML scalar


def unified_diff(old: str, new: str, path: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{path.lstrip('/')}", tofile=f"b/{path.lstrip('/')}"))


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
