"""Text for the evaluations: local files (a file, a directory, a glob), a ``datasets`` dataset, or a
built-in generated filler that needs nothing at all."""
from __future__ import annotations

import glob as _glob
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    return sorted(Path(p) for p in _glob.glob(str(path), recursive=True) if Path(p).is_file())


def _dataset(spec: str, text_field: str, limit: int | None) -> list[Document]:
    """``hf:NAME[:CONFIG][@SPLIT]``: a datasets dataset (a hub name when online, or a local dataset path)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("reading a dataset needs the `datasets` package: pip install datasets "
                          "(or pass local text files)") from exc
    body, _, split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "test")
    if text_field not in ds.column_names:
        raise ConfigError(f"dataset {name} has no column {text_field!r} (columns: {ds.column_names}); "
                          "pass --text-field")
    docs = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        if row[text_field]:
            docs.append(Document(f"{name}[{i}]", row[text_field]))
    return docs


def load_texts(sources: list[str] | str, *, text_field: str = "text", limit: int | None = None) -> list[Document]:
    """Documents from each source: a text file, a directory (its .txt/.md files, recursively), a glob
    pattern, or ``hf:NAME[:CONFIG][@SPLIT]`` for a ``datasets`` dataset. Raises when nothing is found."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ConfigError("no text given: pass one or more files, directories or glob patterns "
                          "(e.g. --data ../shared/data/books)")
    docs: list[Document] = []
    for source in sources:
        if source.startswith("hf:"):
            docs.extend(_dataset(source, text_field, limit))
            continue
        files = _files(source)
        if not files:
            raise ConfigError(f"no text files found at {source!r} (a file, a directory of .txt/.md files, "
                              "or a glob pattern)")
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(Document(str(f), text))
    if not docs:
        raise ConfigError(f"the sources {sources} hold no text")
    return docs


# Word lists for the built-in filler: grammatical, varied, and free of digits, so a needle's key
# is the only number in the haystack.
_SUBJECTS = ["the old miller", "a tired traveller", "the river", "the baker's daughter", "a flock of geese",
             "the schoolmaster", "the north wind", "an orchard of pears", "the ferryman", "a grey cat",
             "the village choir", "the harbour master", "a cart of turnips", "the clockmaker", "the orchard wall"]
_VERBS = ["watched", "remembered", "carried", "followed", "ignored", "painted", "described", "mended",
          "counted", "crossed", "admired", "forgot", "guarded", "visited", "measured"]
_OBJECTS = ["the long road to the market", "a basket of apples", "the bells of the chapel", "the morning fog",
            "the stones of the old bridge", "a letter from the coast", "the lanterns on the pier",
            "the fields beyond the mill", "a song about the winter", "the boats in the bay",
            "the chimney smoke", "a map of the hills", "the ledger of the inn", "the shadow of the tower"]
_TAILS = ["before the rain came", "while the kettle boiled", "as the light faded", "for most of the afternoon",
          "without a word to anyone", "on the first day of spring", "after the fair had ended",
          "until the lamps were lit", "with great patience", "as everyone expected"]


def generated_filler(n_sentences: int, seed: int = 0) -> str:
    """Deterministic filler prose of ``n_sentences`` sentences (the default needle haystack)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        sentences.append(s[0].upper() + s[1:])
    return " ".join(sentences)
