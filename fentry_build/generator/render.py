"""generator/render.py - the registration C source of a patch, from its resolved replacements.

The template is templates/registration.c.j2, rendered through the package's one jinja2
environment (fentry_build.jinja).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fentry_build import jinja
from fentry_build.binary.elf import JUMP_ROW, BinaryInfo, site_bytes_hex
from fentry_build.generator.patchsrc import CALLBACK_MACROS, PatchSource
from fentry_build.generator.resolve import ResolvedRef, ResolvedReplacement

TEMPLATE = "registration.c.j2"
PLACEMENT_TEMPLATE = "placement.h.j2"


def _func_context(r: ResolvedReplacement, patch_name: str) -> dict[str, Any]:
    f, rep = r.function, r.replacement
    assert f.site is not None
    return {
        "name": f.name, "file": f.file if f.local else None, "addr": f.addr,
        "site_offset": f.site.offset, "site_len": f.site.length, "site_form": f.site.form.c_name,
        "site_bytes": site_bytes_hex(f.site), "entry": f.site.entry,
        "new": rep.new, "old": rep.old, "orig_symbol": r.orig_symbol,
        "spelled": rep.spelled(), "line": rep.line, "patch_name": patch_name,
    }


def _ref_context(r: ResolvedRef, patch_name: str) -> dict[str, Any]:
    sym = r.symbol
    return {
        "slot": r.ref.name, "name": sym.name, "file": sym.file if sym.local else None,
        "addr": sym.addr, "size": sym.size, "kind": sym.kind, "spelled": r.ref.spelled(),
        "line": r.ref.line, "patch_name": patch_name,
    }


def render(binary: BinaryInfo, build_id: bytes, patch: PatchSource,
           resolved: Sequence[ResolvedReplacement], refs: Sequence[ResolvedRef] = ()) -> str:
    """The registration C source for `resolved` replacements and `refs` of `patch` in `binary`,
    whose build-id `build_id` the generator has checked (main.check_build_id)."""
    funcs = [_func_context(r, patch.path.name) for r in resolved]
    renamed = [
        {"old": r.replacement.old, "orig_symbol": r.orig_symbol, "file": r.replacement.file or "?"}
        for r in resolved if r.orig_symbol != r.replacement.old
    ]
    callbacks = []
    for macro, field_name in CALLBACK_MACROS.items():
        use = patch.callback(field_name)
        callbacks.append({
            "field": field_name, "macro": macro,
            "type": "fentry_pre_patch_fn" if field_name == "pre_patch" else "fentry_callback_fn",
            "fn": use.name if use else None, "line": use.line if use else None,
        })
    return jinja.environment().get_template(TEMPLATE).render(
        target=binary.name, patch_name=patch.path.name, build_id=build_id,
        build_id_hex=build_id.hex(), funcs=funcs, renamed=renamed,
        refs=[_ref_context(r, patch.path.name) for r in refs], callbacks=callbacks,
        replace_all=patch.replace_all, replace_all_line=patch.replace_all_line,
    )


def placements(resolved: Sequence[ResolvedReplacement]) -> dict[str, int]:
    """Each replacement's entry residue (mod JUMP_ROW): where its site's patched jump can go
    straight to it (the first use decides for a replacement of several functions)."""
    places: dict[str, int] = {}
    for r in resolved:
        site = r.function.site
        assert site is not None
        places.setdefault(r.replacement.new, site.jump_residue(r.function.addr))
    return places


def render_placement(target: str, patch_name: str, places: dict[str, int] | None) -> str:
    """The placement header (fentry.h, FENTRY_PLACE); `places` None: the placeholder written
    before the first run, which places nothing."""
    return jinja.environment().get_template(PLACEMENT_TEMPLATE).render(
        target=target, patch_name=patch_name, places=places, row=JUMP_ROW)


__all__ = ["PLACEMENT_TEMPLATE", "TEMPLATE", "placements", "render", "render_placement"]
