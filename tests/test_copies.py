"""Every block marked `# Copied from <file>` must be identical to its source, character for character.

The method files duplicate small boilerplate on purpose (a reader opens one file and sees
everything). The marker goes on the line directly above a top-level `def` or `class` (above its
decorators); this test finds the definition of the same name in the named file and compares the
two source texts (decorators, docstring and comments included), so a fix made in one copy cannot
silently miss the others.
"""
import ast
import functools
import re

import pytest

from conftest import ROOT

METHOD_FILES = ("attgan.py", "dual_transfer.py", "cgan.py", "feature_ae.py", "mad.py")
MARKER = re.compile(r"^# Copied from (\w+\.py)\s*$")


@functools.lru_cache(maxsize=None)
def top_level_definitions(path):
    """name -> (source text, first line) of each top-level def/class in `path`, its decorators
    included (read once per session: ast.get_source_segment re-splits the file for every definition)."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    nodes = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    starts = [min([node.lineno] + [d.lineno for d in node.decorator_list]) for node in nodes]
    return {node.name: ("".join(lines[start - 1:node.end_lineno]), start) for node, start in zip(nodes, starts)}


def marked_copies():
    """(file, name, source file) for every marker; a marker not above a definition is an error."""
    found = []
    for name in METHOD_FILES:
        path = ROOT / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        starts = {line: defname for defname, (_, line) in top_level_definitions(path).items()}
        for number, line in enumerate(lines, start=1):
            match = MARKER.match(line)
            if match:
                defname = starts.get(number + 1)
                assert defname, f"{name}:{number}: '# Copied from' must sit directly above a top-level def/class"
                found.append((name, defname, match.group(1)))
    return found


COPIES = marked_copies()


def test_method_files_mark_their_copies():
    """Every present method file besides the source carries at least one marked copy."""
    present = [n for n in METHOD_FILES[1:] if (ROOT / n).exists()]
    marked = {name for name, _, _ in COPIES}
    assert set(present) <= marked, f"no '# Copied from' blocks in {sorted(set(present) - marked)}"


@pytest.mark.parametrize("name", METHOD_FILES[1:])
def test_copied_blocks_are_identical_to_their_source(name):
    """One test per method file: every block it marks as copied is its source's, character for
    character (the failure lists each block that differs)."""
    if not (ROOT / name).exists():
        pytest.skip(f"{name} is not in the repository")
    own = top_level_definitions(ROOT / name)
    differ = []
    for file, defname, source in COPIES:
        if file != name:
            continue
        originals = top_level_definitions(ROOT / source)
        if defname not in originals:
            differ.append(f"{defname} (no such definition in {source})")
        elif own[defname][0] != originals[defname][0]:
            differ.append(defname)
    assert not differ, f"{name}: make these identical to their source: {', '.join(differ)}"
