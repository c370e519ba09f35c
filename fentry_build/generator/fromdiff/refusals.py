"""refusals.py - what a function-level live patch cannot do, each as one line with what to do instead."""

from __future__ import annotations

from collections.abc import Iterable

from fentry_build.errors import FentryError

SHADOW_HINT = "keep new data in a shadow variable (fentry_shadow_get_or_alloc, docs/patch-authoring.md)"


class Refusal(FentryError):
    """The diff holds a change a live patch cannot make; the message names it and the way out."""


def _join(names: Iterable[str]) -> str:
    items = list(names)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def changed_type(kind: str, name: str, what: str, users: list[str]) -> Refusal:
    used = f"; unchanged code uses it ({_join(users)})" if users else ""
    return Refusal(
        f"{kind} {name} changed ({what}){used}: the running program's code and objects keep the "
        f"old layout, so a live patch cannot change it; keep {kind} {name} as it was and "
        f"{SHADOW_HINT}")


def changed_initializer(name: str, file: str) -> Refusal:
    return Refusal(
        f"the initial value of {name} ({file}) changed: the running program's {name} was "
        "initialised long ago and a patch does not re-initialise it; keep the initializer and set "
        f"the new value in a FENTRY_POST_PATCH callback (FENTRY_REF({name}, ...))")


def new_global(name: str, file: str) -> Refusal:
    return Refusal(
        f"the fix adds the global variable {name} ({file}): the running program has no such "
        f"variable and other code cannot link to one in a patch; {SHADOW_HINT}, or make it "
        "static to the patch's code")


def no_fentry_site(name: str, file: str | None, program: str) -> Refusal:
    where = f" ({file})" if file else ""
    return Refusal(
        f"the fix changes {name}{where}, which has no fentry site in {program} (not compiled with "
        "-pg -mfentry), so no patch can replace it; build that file with dependency('fentry') "
        "and restart the program once, or change only instrumented functions")


def header_only(headers: list[str], reached: dict[str, list[str]]) -> Refusal:
    spread = "; ".join(f"{unit}: {_join(funcs)}" for unit, funcs in sorted(reached.items()))
    return Refusal(
        f"the fix changes only {_join(headers)}, which changes code in {len(reached)} translation "
        f"units ({spread}); a patch generated from it would replace all of them: make the change in "
        "the one .c file that needs it, or write the patch by hand for those functions")


def changed_signature(name: str, old: str, new: str) -> Refusal:
    return Refusal(
        f"the fix changes the type of {name} from {old} to {new}: every caller in the running "
        f"program passes the old arguments; keep {name}'s prototype, and give the new behaviour a "
        "new helper function that the fixed callers call")


def unsupported(what: str, fix: str) -> Refusal:
    return Refusal(f"{what}; {fix}")
