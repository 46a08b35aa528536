"""Prompt-group files of the multi-prompt long-video benchmark, and matching videos to groups.

A *prompt group* is one narrative: successive prompts, one per segment of one video (the
interactive benchmark of LongLive / MemFlow uses 6 prompts per group and 100 groups). Accepted
files, detected from their content:

* **JSONL** (the official format): one JSON value per line. An object holds its prompts in a
  list under the first of :data:`PROMPT_KEYS` it has (``"prompts"``, ``"prompt_list"``,
  ``"texts"``, ...; failing those, its only list-of-strings value) and optionally its id under
  the first of :data:`ID_KEYS` (``"id"``, ``"name"``, ...). A line may also be a plain JSON list
  of prompts. A prompt may be a string or an object with a ``"text"`` / ``"prompt"`` /
  ``"caption"`` string.
* **JSON**: one document holding a list of such groups (or one group, or ``{"groups": [...]}``).
* **Plain text**, one of two layouts. Blank-line separated blocks of several lines: each block
  is a group, each of its lines one prompt. Otherwise (no block has more than one line): each
  line is a group whose prompts are separated by ``" | "`` (any ``|``). In both, lines starting
  with ``#`` are comments, and a group may be named by a leading ``[name]`` (on its own line at
  the top of a block, or before the prompts of a line); a file of a single block is read as
  blocks only when it starts with such a ``[name]`` line.

A file whose first line (after ``#`` comments) starts with ``{``, or with ``[`` and parses as
JSON, is JSON / JSONL; anything else is text.

A group without an id is named by its 0-based position in the file, zero-padded to three digits
(``"000"``, ``"001"``, ...). Ids name files, so characters other than letters, digits, ``.``,
``_`` and ``-`` are replaced by ``_``; duplicate ids are an error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ID_KEYS",
    "OFFICIAL_VIDEO_NAME",
    "PROMPT_KEYS",
    "PromptGroup",
    "PromptFileError",
    "load_prompt_groups",
    "match_videos",
    "parse_prompt_groups",
    "sanitize_id",
    "save_prompt_groups",
]

#: Keys under which a JSON group may hold its list of prompts, tried in this order.
PROMPT_KEYS = (
    "prompts",
    "prompt_list",
    "prompts_list",
    "texts",
    "text_list",
    "captions",
    "segments",
    "prompt",
)
#: Keys under which a JSON group may hold its id, tried in this order.
ID_KEYS = ("id", "name", "group_id", "video_id", "key", "idx", "index")
_TEXT_KEYS = ("text", "prompt", "caption")

#: The official inference scripts name videos ``rank{rank}-{line index}-{sample}_{model}.mp4``.
OFFICIAL_VIDEO_NAME = re.compile(r"^rank\d+-(?P<id>\d+)-\d+")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_PREFIX = re.compile(r"^\[([^\]]+)\]\s*")


class PromptFileError(ValueError):
    """A prompt file that cannot be read as prompt groups (the message names the line)."""


@dataclass(frozen=True)
class PromptGroup:
    """One narrative: the prompts of one video's successive segments.

    Attributes:
        id: a file-name-safe identifier, unique within its file.
        prompts: the segment prompts, in order.
        index: the group's 0-based position in its file.
    """

    id: str
    prompts: tuple[str, ...]
    index: int = 0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"prompt group {self.id!r} holds no prompts")
        for prompt in self.prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt group {self.id!r}: empty or non-string prompt {prompt!r}")
        if not self.id or sanitize_id(self.id) != self.id:
            raise ValueError(f"group id {self.id!r} is not file-name safe; use sanitize_id()")


def sanitize_id(value: Any) -> str:
    """A file-name-safe id: runs of characters other than ``[A-Za-z0-9._-]`` become ``_``."""
    text = _UNSAFE.sub("_", str(value).strip()).strip("_")
    if text in ("", ".", ".."):
        raise ValueError(f"{value!r} cannot be turned into a file-name-safe id")
    return text


def load_prompt_groups(path: str | os.PathLike[str]) -> list[PromptGroup]:
    """Read prompt groups from a JSONL, JSON or plain-text file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise PromptFileError(f"{path}: cannot read the prompt file ({error})") from error
    return parse_prompt_groups(text, source=str(path))


def parse_prompt_groups(text: str, *, source: str = "<prompts>") -> list[PromptGroup]:
    """Parse the content of a prompt file (see the module docstring for the formats)."""
    text = text.lstrip("\ufeff")
    stripped = text.strip()
    if not stripped:
        raise PromptFileError(f"{source}: no prompt groups (the file is empty)")
    # (id or None, prompts, line number) per group
    raw = _parse_json(text, source) if _looks_like_json(stripped) else _parse_text(text, source)
    if not raw:
        raise PromptFileError(f"{source}: no prompt groups found")
    groups = []
    seen: dict[str, int] = {}
    for index, (name, prompts, line) in enumerate(raw):
        where = f"{source}:{line}"
        try:
            group_id = sanitize_id(name) if name is not None else f"{index:03d}"
            group = PromptGroup(group_id, tuple(prompts), index)
        except ValueError as error:
            raise PromptFileError(f"{where}: {error}") from error
        if group_id in seen:
            raise PromptFileError(
                f"{where}: duplicate group id {group_id!r} (first at line {seen[group_id]})"
            )
        seen[group_id] = line
        groups.append(group)
    return groups


def save_prompt_groups(
    groups: Iterable[PromptGroup], path: str | os.PathLike[str]
) -> Path:
    """Write groups as JSONL (``{"id": ..., "prompts": [...]}`` per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"id": group.id, "prompts": list(group.prompts)}, ensure_ascii=False)
        for group in groups
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ matching
def match_videos(
    groups: Sequence[PromptGroup],
    paths: Iterable[str | os.PathLike[str]],
    id_pattern: str | re.Pattern[str] | None = None,
) -> tuple[list[tuple[Path, PromptGroup]], list[Path]]:
    """Map video files to prompt groups by file name.

    A video's *key* is taken from its file stem: with ``id_pattern``, the regular expression's
    named group ``id`` (else its first group, else the whole match) searched in the stem;
    without it, the stem itself, or the line index in the official inference scripts' names
    (:data:`OFFICIAL_VIDEO_NAME`, ``rank0-12-0_lora.mp4`` -> ``12``). A key names the group with
    that id; failing that, a key made of digits names the group at that 0-based position.

    Returns:
        ``(matches, unmatched)``: ``(path, group)`` pairs in path order (several videos may match
        one group, e.g. several samples), and the paths that match no group.
    """
    pattern = re.compile(id_pattern) if isinstance(id_pattern, str) else id_pattern
    by_id = {group.id: group for group in groups}
    by_index = {group.index: group for group in groups}
    matches, unmatched = [], []
    for path in sorted(Path(p) for p in paths):
        group = None
        for key in _video_keys(path.stem, pattern):
            group = by_id.get(key)
            if group is None and key.isdigit():
                group = by_index.get(int(key))
            if group is not None:
                break
        if group is None:
            unmatched.append(path)
        else:
            matches.append((path, group))
    return matches, unmatched


def _video_keys(stem: str, pattern: re.Pattern[str] | None) -> list[str]:
    if pattern is not None:
        found = pattern.search(stem)
        if found is None:
            return []
        if "id" in pattern.groupindex:
            return [found.group("id")]
        return [found.group(1) if pattern.groups else found.group(0)]
    keys = [stem]
    official = OFFICIAL_VIDEO_NAME.match(stem)
    if official:
        keys.append(official.group("id"))
    return keys


# -------------------------------------------------------------------------------------- JSON
def _looks_like_json(stripped: str) -> bool:
    """``{...`` always; ``[...`` when the document or its first line parses (else it is a
    text file whose first group is named ``[name]``)."""
    lines = [line.strip() for line in stripped.splitlines()]
    first = next((line for line in lines if line and not line.startswith("#")), "")
    if first.startswith("{"):
        return True
    if not first.startswith("["):
        return False
    for candidate in (stripped, first):
        try:
            json.loads(candidate)
        except json.JSONDecodeError:
            continue
        return True
    return False


def _parse_json(text: str, source: str) -> list[tuple[Any, Any, int]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None  # JSONL (or broken JSON: reported line by line below)
    else:
        return _groups_from_document(document, source)
    raw = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{source}:{number}: not valid JSON ({error.msg})") from error
        raw.append(_group_from_value(value, f"{source}:{number}") + (number,))
    return raw


def _groups_from_document(document: Any, source: str) -> list[tuple[Any, Any, int]]:
    if isinstance(document, dict) and isinstance(document.get("groups"), list):
        document = document["groups"]
    if isinstance(document, dict) or (
        isinstance(document, list) and all(_is_prompt(item) for item in document)
    ):
        return [_group_from_value(document, source) + (1,)]
    if not isinstance(document, list):
        raise PromptFileError(f"{source}: expected a list of prompt groups")
    return [
        _group_from_value(value, f"{source}[{i}]") + (i + 1,) for i, value in enumerate(document)
    ]


def _group_from_value(value: Any, where: str) -> tuple[Any, list[str]]:
    if isinstance(value, list):
        return None, _prompts_from_list(value, where)
    if not isinstance(value, dict):
        raise PromptFileError(f"{where}: expected an object or a list of prompts, got {value!r}")
    name = next((value[key] for key in ID_KEYS if value.get(key) not in (None, "")), None)
    for key in PROMPT_KEYS:
        if key in value:
            prompts = value[key]
            if isinstance(prompts, str):
                prompts = [prompts]
            if not isinstance(prompts, list):
                raise PromptFileError(f"{where}: {key!r} must be a list of prompts")
            return name, _prompts_from_list(prompts, f"{where} {key!r}")
    lists = [
        item for item in value.values()
        if isinstance(item, list) and item and all(_is_prompt(p) for p in item)
    ]
    if len(lists) == 1:
        return name, _prompts_from_list(lists[0], where)
    raise PromptFileError(
        f"{where}: no list of prompts found; expected one of the keys {list(PROMPT_KEYS)}, "
        f"got {sorted(value)}"
    )


def _is_prompt(item: Any) -> bool:
    return isinstance(item, str) or (
        isinstance(item, dict) and any(isinstance(item.get(k), str) for k in _TEXT_KEYS)
    )


def _prompts_from_list(items: list[Any], where: str) -> list[str]:
    prompts = []
    for item in items:
        if isinstance(item, dict):
            item = next((item[k] for k in _TEXT_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str) or not item.strip():
            raise PromptFileError(f"{where}: every prompt must be a non-empty string")
        prompts.append(item.strip())
    if not prompts:
        raise PromptFileError(f"{where}: the group holds no prompts")
    return prompts


# -------------------------------------------------------------------------------------- text
def _parse_text(text: str, source: str) -> list[tuple[Any, Any, int]]:
    lines = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if not line.strip().startswith("#")
    ]
    blocks: list[list[tuple[int, str]]] = [[]]
    for number, line in lines:
        if line:
            blocks[-1].append((number, line))
        elif blocks[-1]:
            blocks.append([])
    blocks = [block for block in blocks if block]
    if any(len(block) > 1 for block in blocks) and (
        len(blocks) > 1 or _is_named_block(blocks[0])
    ):
        return [_group_from_block(block, source) for block in blocks]
    raw = []
    for number, line in (entry for block in blocks for entry in block):
        name, line = _split_name(line)
        prompts = [part.strip() for part in line.split("|")]
        if any(not part for part in prompts):
            raise PromptFileError(f"{source}:{number}: empty prompt between '|' separators")
        raw.append((name, prompts, number))
    return raw


def _is_named_block(block: list[tuple[int, str]]) -> bool:
    """A single block whose first line is only ``[name]`` is a block, not a list of lines."""
    return len(block) > 1 and _NAME_PREFIX.fullmatch(block[0][1]) is not None


def _group_from_block(block: list[tuple[int, str]], source: str) -> tuple[Any, Any, int]:
    first_number, first = block[0]
    name, rest = _split_name(first)
    lines = [line for _, line in block]
    if name is not None:
        lines = ([rest] if rest else []) + lines[1:]
    if not lines:
        raise PromptFileError(f"{source}:{first_number}: group {name!r} holds no prompts")
    return name, lines, first_number


def _split_name(line: str) -> tuple[str | None, str]:
    found = _NAME_PREFIX.match(line)
    if found is None:
        return None, line
    return found.group(1).strip(), line[found.end():].strip()
