"""The docs' configuration examples are valid configs, so the docs stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lbgw.config import MethodKind, load_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

_TOML = re.compile(r"^```toml\n(.*?)^```", re.DOTALL | re.MULTILINE)


def test_the_readme_config_example_is_valid(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Configuration") :]
    match = _TOML.search(section)
    assert match is not None, "no ```toml block under ## Configuration"
    path = tmp_path / "lbgw.toml"
    path.write_text(match.group(1), encoding="utf-8")

    config = load_config(path)

    (listener,) = config.listeners
    assert listener.address == "0.0.0.0:50051"
    (users,) = config.clusters
    assert (users.name, users.strategy, len(users.endpoints)) == ("users", "ewma", 3)
    assert [e.weight for e in users.endpoints] == [3, 1, 1]
    assert (users.health_check.mode, users.health_check.rpc) == ("grpc", "watch")
    assert dict(users.methods) == {"/shop.users.v1.Users/Get": MethodKind.UNARY}
    (route,) = config.routes
    assert (route.match, route.value, route.cluster) == ("package", "shop", "users")


def _toml_blocks() -> list[object]:
    return [
        pytest.param(match.group(1), id=f"{doc.name}-{n}")
        for doc in DOCS
        for n, match in enumerate(_TOML.finditer(doc.read_text(encoding="utf-8")), start=1)
    ]


@pytest.mark.parametrize("block", _toml_blocks())
def test_every_config_example_in_docs_is_valid(tmp_path: Path, block: str) -> None:
    """A fragment without a listener is read with one, as it would be used."""
    if "[[listeners]]" not in block:
        block = '[[listeners]]\naddress = "127.0.0.1:0"\n\n' + block
    path = tmp_path / "lbgw.toml"
    path.write_text(block, encoding="utf-8")
    assert load_config(path).clusters


def test_the_readme_is_a_short_read() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = _FENCE.sub("", doc.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.MULTILINE)}


def _links() -> list[object]:
    links: list[object] = []
    for doc in [README, ROOT / "bench" / "README.md", *DOCS]:
        text = _FENCE.sub("", doc.read_text(encoding="utf-8"))
        for target in _LINK.findall(text):
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked
                name = f"{doc.relative_to(ROOT)}->{target}"
                links.append(pytest.param(doc, target, id=name))
    return links


@pytest.mark.parametrize(("doc", "target"), _links())
def test_every_relative_link_leads_somewhere(doc: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    linked = (doc.parent / path).resolve() if path else doc
    assert linked.exists(), f"{doc.name}: {target}: no such file"
    if anchor and linked.suffix == ".md":
        assert anchor in _anchors(linked), f"{doc.name}: {target}: no such heading"
