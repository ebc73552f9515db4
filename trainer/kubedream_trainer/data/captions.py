"""Captions: where an image's caption comes from, and how it varies each time it is drawn.

Precedence (highest first; the first source that yields a non-empty caption wins):

1. sidecar `<stem>.yaml` / `<stem>.yml` (EveryDream's format: `main_prompt` and `tags`),
2. sidecar `<stem>.caption`, then `<stem>.txt`,
3. the folder's `local.yaml` (`main_prompt` / `tags`),
4. the nearest `global.yaml` up the tree, within the root,
5. the file name: the text before the first underscore (`person_ (3).jpg` -> `person`).

The scanner resolves the caption once; the loader calls `process_caption` per draw.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

CAPTION_SIDECARS = (".yaml", ".yml", ".caption", ".txt")
"""Sidecar extensions, highest precedence first."""


def caption_from_filename(stem: str) -> str:
    """EveryDream's last resort: the stem up to the first underscore, stripped."""
    return stem.split("_", 1)[0].strip()


def caption_from_text(data: bytes) -> str:
    """A `.caption` / `.txt` sidecar's caption, whitespace runs (newlines too) made one space.

    Raises ValueError when the file is not UTF-8.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return " ".join(text.split())


def caption_from_yaml(doc: Mapping[str, object]) -> str | None:
    """`main_prompt` + ", " + the tags joined by ", "; None when the document sets neither.

    `tags` is a list of strings or of `{tag: str, weight: float}` mappings (EveryDream's
    format). Weights only order tags in EveryDream's length-limited captions, which
    KubeDream does not do, so they are ignored. A list `main_prompt` uses its first item,
    as EveryDream does. Raises ValueError for a malformed value.
    """
    main = doc.get("main_prompt", doc.get("caption"))
    if isinstance(main, list):
        main = main[0] if main else None
    if main is not None and (not isinstance(main, str | int | float) or isinstance(main, bool)):
        raise ValueError(f"main_prompt: expected a string, got {type(main).__name__}")
    parts = [str(main).strip()] if main is not None and str(main).strip() else []
    tags = doc.get("tags")
    if tags is not None:
        if not isinstance(tags, list):
            raise ValueError(f"tags: expected a list, got {type(tags).__name__}")
        for i, tag in enumerate(tags):
            if isinstance(tag, Mapping):
                tag = tag.get("tag")
            if not isinstance(tag, str | int | float) or isinstance(tag, bool):
                raise ValueError(
                    f"tags[{i}]: expected a string or {{tag: ..., weight: ...}}, got {tag!r}"
                )
            if str(tag).strip():
                parts.append(str(tag).strip())
    return ", ".join(parts) if parts else None


def process_caption(caption: str, rng: random.Random, shuffle_tags: bool, keep_tags: int) -> str:
    """The caption as trained this time: with `shuffle_tags`, the comma-separated tags after
    the first `keep_tags` are shuffled (empty tags dropped, rejoined with ", ")."""
    if not shuffle_tags:
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    kept, shuffled = tags[:keep_tags], tags[keep_tags:]
    rng.shuffle(shuffled)
    return ", ".join(kept + shuffled)
