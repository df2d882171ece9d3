"""Griffe extension for the API reference: Sphinx roles become links, ``#:`` comments docstrings.

Loaded by mkdocstrings (``mkdocs.yml``); it changes what the site shows, never the library.

The library's docstrings are Google style with Sphinx cross-reference roles
(``:func:`grad```, ``:class:`FrozenParam```, ``:meth:`migrate```). mkdocstrings
renders Markdown, where a role would show as literal text: this extension turns
each role into an autorefs link to the public name it refers to, resolved the
way a reader would: first in the object's own public module (``flax_freeze.linen``
or ``flax_freeze.checkpoint`` for their members), then in the class the object
belongs to (for ``:meth:``), then at the top level (``flax_freeze``). A role
that names nothing public is rendered as code. An ``Example:`` section is read
as griffe's ``Examples:``, so its ``>>>`` lines render as code. A module attribute documented by
a ``#:`` comment above it (``Trainable``) gets that comment as its docstring.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

#: Google style allows "Example:" as well as "Examples:"; griffe knows only the latter.
EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
ROLE = re.compile(r":(?:func|class|meth|data|attr|mod|obj|exc):`~?([^`]+)`")
#: Public modules, most specific first, with the private modules documented through them.
PUBLIC = {
    "flax_freeze.linen": ("flax_freeze.linen", "flax_freeze._boxes"),
    "flax_freeze.checkpoint": ("flax_freeze.checkpoint",),
    "flax_freeze": ("flax_freeze",),
}


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring of ``flax_freeze`` once the package is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Walks the package and rewrites docstrings in place."""
        if pkg.name != "flax_freeze":
            return
        public = _public_names(pkg)
        for obj in _walk(pkg):
            if obj.docstring is None and obj.is_attribute:
                comment = _hash_colon_comment(obj)
                if comment:
                    obj.docstring = griffe.Docstring(comment, parent=obj)
            if obj.docstring is not None:
                text = _literal_blocks(EXAMPLE.sub(r"\1Examples:", obj.docstring.value))
                obj.docstring.value = ROLE.sub(lambda m, o=obj: _link(m.group(1), o, public), text)


def _literal_blocks(text: str) -> str:
    """Turns reST literal blocks (a paragraph ending in ``::``, then an indented block) into fences.

    The fence starts at the margin of the docstring section the paragraph is in,
    so a literal block that ends a list item follows the list.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        if not stripped.endswith("::") or stripped.strip() == "::" and not out:
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        body_indent = len(lines[j]) - len(lines[j].lstrip()) if j < len(lines) else 0
        if j >= len(lines) or body_indent <= indent:
            out.append(line)
            i += 1
            continue
        end = j
        while end < len(lines) and (
            not lines[end].strip() or lines[end].startswith(" " * body_indent)
        ):
            end += 1
        while end > j and not lines[end - 1].strip():
            end -= 1
        margin = " " * _margin(lines, i)
        head = stripped[:-2].rstrip()
        out.append(head + ":" if head.strip() else "")
        out += ["", margin + "```python"]
        out += [margin + body[body_indent:] if body.strip() else "" for body in lines[j:end]]
        out += [margin + "```", ""]
        i = end
    return "\n".join(out)


def _margin(lines: list[str], index: int) -> int:
    """The indentation of the paragraph or list that ``lines[index]`` belongs to."""
    margin = len(lines[index]) - len(lines[index].lstrip())
    k = index
    while k >= 0 and lines[k].strip():
        margin = min(margin, len(lines[k]) - len(lines[k].lstrip()))
        k -= 1
    return margin


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    out = [obj]
    for member in obj.members.values():
        if member.is_alias:
            continue
        out.extend(_walk(member))  # type: ignore[arg-type]
    return out


def _public_names(pkg: griffe.Module) -> dict[str, str]:
    """Canonical paths of public objects -> the public path they are documented under."""
    names: dict[str, str] = {}
    for module_path in PUBLIC:
        module = (
            pkg if module_path == "flax_freeze" else pkg.get_member(module_path.split(".", 1)[1])
        )
        for name in module.exports or ():
            member = module.get_member(name)
            public_path = f"{module_path}.{name}"
            names.setdefault(public_path, public_path)
            try:
                names.setdefault(member.canonical_path, public_path)
            except griffe.AliasResolutionError:
                pass
            if member.is_class or (member.is_alias and member.final_target.is_class):
                target = member.final_target if member.is_alias else member
                for sub in target.members:
                    if not sub.startswith("_"):
                        names.setdefault(f"{target.canonical_path}.{sub}", f"{public_path}.{sub}")
                        names.setdefault(f"{public_path}.{sub}", f"{public_path}.{sub}")
    return names


def _public_module(obj: griffe.Object) -> str:
    module = obj.module.path
    for public, privates in PUBLIC.items():
        if module in privates:
            return public
    return "flax_freeze"


def _link(target: str, obj: griffe.Object, public: dict[str, str]) -> str:
    candidates = [target]
    owner = obj if obj.is_class else obj.parent
    if owner is not None and owner.is_class:
        candidates.append(f"{owner.canonical_path}.{target}")
    candidates.append(f"{_public_module(obj)}.{target}")
    candidates.append(f"flax_freeze.{target}")
    for candidate in candidates:
        if candidate in public:
            return f"[`{target}`][{public[candidate]}]"
    return f"`{target}`"


def _hash_colon_comment(obj: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above an attribute, without the markers."""
    if obj.lineno is None or obj.filepath is None:
        return None
    lines = dict(obj.lines_collection.items()).get(obj.filepath, [])
    found: list[str] = []
    index = obj.lineno - 2
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        found.insert(0, lines[index].lstrip()[2:].strip())
        index -= 1
    return "\n".join(found) or None
