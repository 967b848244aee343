"""The README stays true to the code: its generated blocks (the supported layer types, a
``describe()`` table, the settings table) match what the code gives, and every path the docs
name exists.

``python3 tests/test_docs.py --write`` rewrites the generated blocks from the code.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import pytest
from test_describe import described

from seng_dist import SENGConfig, supported_layer_types

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the documents whose paths must exist
DOCS = [
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "integrations").glob("**/README.md")),
    *sorted((ROOT / "examples" / "results").glob("**/README.md")),
]
#: a path in backticks or a Markdown link that starts at one of these folders is checked
_TOP = ("seng_dist/", "examples/", "tests/", "ci/", "docs/", "integrations/")


def supported_block() -> str:
    """The README's list of the layer types SENG preconditions."""
    return "Preconditioned: " + ", ".join(f"`{t}`" for t in supported_layer_types()) + "."


def describe_block() -> str:
    """``describe()`` of tests/test_describe.py's model after one step, as a code block."""
    return "```\n" + described()[1].describe() + "\n```"


GENERATED: dict[str, Callable[[], str]] = {
    "supported-types": supported_block,
    "describe": describe_block,
}


def block(text: str, name: str) -> tuple[int, int]:
    """Where the text between ``<!-- name: begin ... -->`` and ``<!-- name: end -->`` is."""
    begin = re.search(rf"<!-- {name}: begin[^>]*-->\n", text)
    end = text.find(f"<!-- {name}: end -->")
    if begin is None or end < begin.end():
        raise AssertionError(f"README.md has no '<!-- {name}: begin/end -->' markers")
    return begin.end(), end


def stale_blocks(text: str) -> list[str]:
    """The generated blocks of ``text`` that differ from what the code gives now."""
    stale = []
    for name, make in GENERATED.items():
        start, end = block(text, name)
        if text[start:end].strip() != make().strip():
            stale.append(name)
    return stale


def write(text: str) -> str:
    """``text`` with every generated block made anew."""
    for name, make in GENERATED.items():
        start, end = block(text, name)
        text = text[:start] + make().strip() + "\n" + text[end:]
    return text


def settings_rows(text: str) -> dict[str, str]:
    """The settings table: each setting's documented default, as written."""
    start, end = block(text, "settings")
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", text[start:end], flags=re.M)
    return dict(rows)


def test_generated_blocks_match_the_code() -> None:
    stale = stale_blocks(README.read_text())
    assert not stale, (
        f"README.md's generated blocks {stale} are stale: run "
        "'python3 tests/test_docs.py --write' and read the diff"
    )


def test_a_stale_example_is_caught() -> None:
    # The check itself can fail: a describe() table from before a change is reported.
    text = write(README.read_text())
    old = text.replace("explicit_threshold 200", "explicit_threshold 100", 1)
    assert stale_blocks(old) == ["describe"]
    assert stale_blocks(text.replace("`nn.Linear`", "`nn.Bilinear`", 1)) == ["supported-types"]


def config_defaults() -> dict[str, object]:
    """Every setting's flat name and default, in ``SENGConfig.setting_names()``'s order."""
    config = SENGConfig()
    values = {}
    for part in (config, config.sketch, config.distributed, config.diagonal):
        values.update({f.name: getattr(part, f.name) for f in dataclasses.fields(part)})
    # A named choice (an enum) is documented as the string users pass.
    return {
        name: v.value if isinstance(v, Enum) else v
        for name, v in ((n, values[n]) for n in SENGConfig.setting_names())
    }


def test_settings_table_lists_every_setting_with_its_default() -> None:
    rows = settings_rows(README.read_text())
    defaults = config_defaults()
    assert list(rows) == list(defaults), "README's settings table: names or order differ"
    wrong = {k: (rows[k], repr(v)) for k, v in defaults.items() if rows[k] != repr(v)}
    assert not wrong, f"README's settings table: documented vs actual defaults {wrong}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_the_docs_name_exists(doc: Path) -> None:
    text = doc.read_text()
    # Paths in backticks are checked when they start at a top-level folder; every link that
    # is not a web address is. A path is read from the document's folder or from the root.
    named = [p for p in re.findall(r"`([\w./-]+)`", text) if p.startswith(_TOP)]
    named += [p for p in re.findall(r"\]\(([^)#\s]+)", text) if not re.match(r"\w+:", p)]
    missing = [p for p in named if not (doc.parent / p).exists() and not (ROOT / p).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python3 tests/test_docs.py --write")
    README.write_text(write(README.read_text()))
