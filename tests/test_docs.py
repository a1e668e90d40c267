"""The docs point at things that exist: relative links resolve, and every flag they name is a real one."""

import re
from pathlib import Path

import pytest

from fm_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _run_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    run = sub.choices["run"]  # type: ignore[attr-defined]
    return {flag for action in run._actions for flag in action.option_strings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    targets = re.findall(r"\]\(([^)#\s]+)\)", doc.read_text()) + re.findall(r'src="([^"]+)"', doc.read_text())
    local = [t for t in targets if "://" not in t]
    missing = [t for t in local if not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_method_doc_names_only_real_flags():
    text = (ROOT / "docs" / "method.md").read_text()
    named = set(re.findall(r"`(--[a-z][a-z-]*)", text))
    assert {"--fisher-samples", "--include-last-layer", "--greedy"} <= named  # the check sees the flags
    assert named <= _run_flags(), named - _run_flags()
