"""generator/patchsrc.py - finds the FENTRY_* macro uses in a patch source with a small C tokenizer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fentry_build.errors import FentryError

REPLACE_MACRO = "FENTRY_REPLACE"
ORIGINAL_MACROS = frozenset({"FENTRY_ORIGINAL", "FENTRY_DECLARE_ORIGINAL"})
REF_MACRO = "FENTRY_REF"
VAR_MACRO = "FENTRY_VAR"
REPLACE_ALL_MACRO = "FENTRY_REPLACE_ALL"
# Each callback macro and the field of struct fentry_patch it fills.
CALLBACK_MACROS = {
    "FENTRY_PRE_PATCH": "pre_patch",
    "FENTRY_POST_PATCH": "post_patch",
    "FENTRY_PRE_UNPATCH": "pre_unpatch",
    "FENTRY_POST_UNPATCH": "post_unpatch",
}
OUR_MACROS = frozenset(
    {REPLACE_MACRO, REF_MACRO, VAR_MACRO, REPLACE_ALL_MACRO, *ORIGINAL_MACROS, *CALLBACK_MACROS}
)
CONDITIONAL_OPENERS = frozenset({"if", "ifdef", "ifndef"})
OPENING_BRACKETS = frozenset({"(", "[", "{"})
CLOSING_BRACKETS = frozenset({")", "]", "}"})
REPLACE_USAGE = "write FENTRY_REPLACE(old_function, new_function) or FENTRY_REPLACE(old_function, new_function, \"file.c\")"
REF_USAGE = "write FENTRY_REF(name, type) or FENTRY_REF(name, type, \"file.c\"), e.g. FENTRY_REF(requests, long)"
USAGES = {
    REPLACE_MACRO: REPLACE_USAGE,
    REF_MACRO: REF_USAGE,
    VAR_MACRO: "write FENTRY_VAR(name) for a name of FENTRY_REF(name, type)",
    REPLACE_ALL_MACRO: "write FENTRY_REPLACE_ALL(); once, at file scope",
    **{m: f"write {m}(function_name); once, at file scope" for m in CALLBACK_MACROS},
}

_IDENT = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_PP_NUMBER = re.compile(r"\.?[0-9](?:[eEpP][+-]|'[A-Za-z0-9_]|[A-Za-z0-9_.])*")
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]+|[0-7]{1,3}|.)", re.S)
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


@dataclass(frozen=True)
class Token:
    """One C token; `directive` numbers the preprocessor line it is on (None outside one)."""

    kind: str  # "ident", "number", "string", "char", "punct"
    text: str
    line: int
    directive: int | None


@dataclass(frozen=True)
class Replacement:
    """FENTRY_REPLACE(old, new [, "file"]) at `line` of the patch."""

    old: str
    new: str
    file: str | None
    line: int

    def spelled(self) -> str:
        file = f', "{self.file}"' if self.file is not None else ""
        return f"{REPLACE_MACRO}({self.old}, {self.new}{file})"


@dataclass(frozen=True)
class OriginalUse:
    """FENTRY_ORIGINAL(old, type) or FENTRY_DECLARE_ORIGINAL(old) at `line`."""

    old: str
    macro: str
    line: int

    def spelled(self) -> str:
        return f"{self.macro}({self.old}, ...)" if self.macro == "FENTRY_ORIGINAL" else f"{self.macro}({self.old})"


@dataclass(frozen=True)
class Reference:
    """FENTRY_REF(name, type [, "file"]) at `line`: the program's own variable or function."""

    name: str
    type: str  # the type as spelled (tokens joined by spaces), for messages
    file: str | None
    line: int

    def spelled(self) -> str:
        file = f', "{self.file}"' if self.file is not None else ""
        return f"{REF_MACRO}({self.name}, {self.type}{file})"


@dataclass(frozen=True)
class NameUse:
    """A macro that takes one name: FENTRY_VAR(name), FENTRY_PRE_PATCH(fn)..., at `line`."""

    macro: str
    name: str
    line: int


@dataclass(frozen=True)
class PatchSource:
    """What the generator needs of a patch source."""

    path: Path
    replacements: tuple[Replacement, ...]
    originals: tuple[OriginalUse, ...]
    refs: tuple[Reference, ...] = ()
    var_uses: tuple[NameUse, ...] = ()       # FENTRY_VAR(name)
    callbacks: tuple[NameUse, ...] = ()      # FENTRY_PRE_PATCH(fn) ..., each macro at most once
    replace_all_line: int | None = None      # the line of FENTRY_REPLACE_ALL(), if any

    @property
    def replace_all(self) -> bool:
        return self.replace_all_line is not None

    def callback(self, field: str) -> NameUse | None:
        """The callback filling struct fentry_patch's `field` ("pre_patch"...), if any."""
        return next((c for c in self.callbacks if CALLBACK_MACROS[c.macro] == field), None)


@dataclass(frozen=True)
class MacroCall:
    """A call of one of our macros in code: its name, its arguments' tokens and its line."""

    name: str
    args: tuple[tuple[Token, ...], ...]
    line: int


def splice_lines(text: str) -> tuple[str, list[int]]:
    """Drop backslash-newlines (C's phase 2); return the text and each character's line."""
    out: list[str] = []
    lines: list[int] = []
    line, i, n = 1, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and text.startswith("\n", i + 1):
            line, i = line + 1, i + 2
            continue
        if c == "\\" and text.startswith("\r\n", i + 1):
            line, i = line + 1, i + 3
            continue
        out.append(c)
        lines.append(line)
        if c == "\n":
            line += 1
        i += 1
    return "".join(out), lines


class Tokenizer:
    """Turns spliced C text into tokens, dropping comments and whitespace."""

    def __init__(self, text: str, lines: list[int]) -> None:
        self._s = text
        self._lines = lines
        self._i = 0
        self._line_start = True
        self._directive: int | None = None
        self._directives = 0

    def tokens(self) -> Iterator[Token]:
        while self._i < len(self._s):
            token = self._next()
            if token is not None:
                yield token

    def _next(self) -> Token | None:
        s, i = self._s, self._i
        c = s[i]
        if c == "\n":
            self._line_start, self._directive = True, None
            self._i += 1
        elif c in " \t\r\f\v":
            self._i += 1
        elif s.startswith("//", i):
            end = s.find("\n", i)
            self._i = len(s) if end < 0 else end
        elif s.startswith("/*", i):
            end = s.find("*/", i + 2)
            self._i = len(s) if end < 0 else end + 2
        else:
            return self._token()
        return None

    def _token(self) -> Token:
        s, start = self._s, self._i
        c = s[start]
        if c == "#" and self._line_start:
            self._directives += 1
            self._directive = self._directives
        if c in "\"'":
            kind, end = ("string" if c == '"' else "char"), self._quoted_end(start, c)
        elif m := _IDENT.match(s, start):
            kind, end = "ident", m.end()
        elif m := _PP_NUMBER.match(s, start):
            kind, end = "number", m.end()
        else:
            kind, end = "punct", start + 1
        self._i, self._line_start = end, False
        return Token(kind, s[start:end], self._lines[start], self._directive)

    def _quoted_end(self, start: int, quote: str) -> int:
        """End of a string or char literal (an unterminated one stops at the newline)."""
        s, i = self._s, start + 1
        while i < len(s) and s[i] not in (quote, "\n"):
            i += 2 if s[i] == "\\" else 1
        return min(i + 1, len(s)) if i < len(s) and s[i] == quote else min(i, len(s))


@dataclass
class _Group:
    """One open #if: is the code under it dead, and is some earlier branch surely taken."""

    outer_dead: bool
    dead: bool
    taken: bool | None  # True: a branch was surely taken; False: none was; None: unknown


class ConditionalTracker:
    """Follows #if/#elif/#else/#endif well enough to know what `#if 0` (or `#if 1 ... #else`) hides."""

    def __init__(self) -> None:
        self._stack: list[_Group] = []

    @property
    def dead(self) -> bool:
        return bool(self._stack) and self._stack[-1].dead

    def directive(self, tokens: list[Token]) -> None:
        if len(tokens) < 2 or tokens[1].kind != "ident":
            return
        name, cond = tokens[1].text, _literal_condition(tokens[2:])
        if name in CONDITIONAL_OPENERS:
            self._open(cond if name == "if" else None)
        elif name == "elif" and self._stack:
            self._elif(self._stack[-1], cond)
        elif name == "else" and self._stack:
            top = self._stack[-1]
            top.dead = top.outer_dead or top.taken is True
        elif name == "endif" and self._stack:
            self._stack.pop()

    def _open(self, cond: bool | None) -> None:
        outer = self.dead
        self._stack.append(_Group(outer, outer or cond is False, cond))

    @staticmethod
    def _elif(top: _Group, cond: bool | None) -> None:
        top.dead = top.outer_dead or top.taken is True or cond is False
        if cond is True:
            top.taken = True
        elif cond is None and top.taken is False:
            top.taken = None


def _literal_condition(tokens: list[Token]) -> bool | None:
    """The value of a condition that is just `0` or `1` (possibly in parentheses), else None."""
    texts = [t.text for t in tokens if t.text not in ("(", ")")]
    if len(texts) == 1 and texts[0] in ("0", "1"):
        return texts[0] == "1"
    return None


class MacroCallFinder:
    """Finds calls of our macros in live code: not in comments, strings, directives or dead #if groups."""

    def __init__(self, path: Path, tokens: list[Token]) -> None:
        self._path = path
        self._tokens = tokens

    def calls(self) -> Iterator[MacroCall]:
        tracker = ConditionalTracker()
        i = 0
        while i < len(self._tokens):
            tok = self._tokens[i]
            if tok.directive is not None:
                j = self._directive_end(i)
                tracker.directive(self._tokens[i:j])
                i = j
            elif not tracker.dead and self._is_macro_call(i):
                call, i = self._call_at(i)
                yield call
            else:
                i += 1

    def _directive_end(self, i: int) -> int:
        number = self._tokens[i].directive
        while i < len(self._tokens) and self._tokens[i].directive == number:
            i += 1
        return i

    def _is_macro_call(self, i: int) -> bool:
        tok = self._tokens[i]
        if tok.kind != "ident" or tok.text not in OUR_MACROS:
            return False
        nxt = self._tokens[i + 1] if i + 1 < len(self._tokens) else None
        return nxt is not None and nxt.text == "(" and nxt.directive is None

    def _call_at(self, i: int) -> tuple[MacroCall, int]:
        """The call starting at token i (the macro's name), and the index after its ')'."""
        head = self._tokens[i]
        args: list[tuple[Token, ...]] = []
        current: list[Token] = []
        depth, j = 0, i + 2
        while j < len(self._tokens):
            tok = self._tokens[j]
            if tok.text in CLOSING_BRACKETS and depth == 0:
                if tok.text != ")":
                    break
                if current or args:
                    args.append(tuple(current))
                return MacroCall(head.text, tuple(args), head.line), j + 1
            if tok.text == "," and depth == 0:
                args.append(tuple(current))
                current = []
            else:
                depth += (tok.text in OPENING_BRACKETS) - (tok.text in CLOSING_BRACKETS)
                current.append(tok)
            j += 1
        usage = USAGES.get(head.text, REPLACE_USAGE)
        raise FentryError(f"{self._path}:{head.line}: {head.text}( is never closed by a ')'; {usage}")


def _spell(tokens: tuple[Token, ...]) -> str:
    return " ".join(t.text for t in tokens) or "nothing"


def _spell_type(tokens: tuple[Token, ...]) -> str:
    """A type's tokens spaced as C is usually written: `void (const char *, int)`, `int (*)[4]`."""
    out = ""
    for prev, tok in zip((None, *tokens), tokens):
        glue = prev is None or prev.text in ("(", "[", "*") or tok.text in (")", "[", "]", ",", ";") \
            or (prev.text == ")" and tok.text == "(")
        out += tok.text if glue else " " + tok.text
    return out


def _decode_c_string(literal: str) -> str:
    """The value of a plain C string literal (quotes included in `literal`)."""

    def unescape(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc[0] == "x":
            return chr(int(esc[1:], 16))
        if esc[0] in "01234567":
            return chr(int(esc, 8))
        return _SIMPLE_ESCAPES.get(esc, esc)

    return _ESCAPE.sub(unescape, literal[1:-1])


class ReplaceCallChecker:
    """Turns FENTRY_REPLACE calls into Replacements, with a one-line error for each misuse."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._by_target: dict[tuple[str, str | None], Replacement] = {}
        self._by_new: dict[str, Replacement] = {}

    def _error(self, line: int, message: str) -> FentryError:
        return FentryError(f"{self._path}:{line}: {message}")

    def replacement(self, call: MacroCall) -> Replacement:
        if len(call.args) not in (2, 3):
            raise self._error(
                call.line, f"{REPLACE_MACRO} takes 2 or 3 arguments (old, new [, \"file.c\"]), "
                f"not {len(call.args)}; {REPLACE_USAGE}")
        old = self._identifier(call, 0, "first", "the name of the program's function")
        new = self._identifier(call, 1, "second", "the name of your replacement function")
        file = self._file(call) if len(call.args) == 3 else None
        return self._remember(Replacement(old, new, file, call.line))

    def _identifier(self, call: MacroCall, index: int, ordinal: str, what: str) -> str:
        arg = call.args[index]
        if len(arg) != 1 or arg[0].kind != "ident":
            raise self._error(
                call.line, f"the {ordinal} argument of {REPLACE_MACRO} must be {what}, "
                f"not '{_spell(arg)}'; {REPLACE_USAGE}")
        return arg[0].text

    def _file(self, call: MacroCall) -> str:
        arg = call.args[2]
        value = _decode_c_string(arg[0].text) if len(arg) == 1 and arg[0].kind == "string" else ""
        if not value:
            raise self._error(
                call.line, f"the third argument of {REPLACE_MACRO} must be the source file of "
                f"the old function in quotes, like \"parser.c\", not '{_spell(arg)}'; {REPLACE_USAGE}")
        return value

    def _remember(self, rep: Replacement) -> Replacement:
        earlier = self._by_target.get((rep.old, rep.file))
        if earlier is not None:
            raise self._error(
                rep.line, f"{rep.spelled()} replaces {rep.old} again (line {earlier.line} already "
                "does); replace each function once: remove one of them")
        earlier = self._by_new.get(rep.new)
        if earlier is not None:
            raise self._error(
                rep.line, f"{rep.new} already replaces {earlier.old} (line {earlier.line}); "
                f"{REPLACE_MACRO} can use a replacement once: write another function for {rep.old}")
        self._by_target[(rep.old, rep.file)] = rep
        self._by_new[rep.new] = rep
        return rep


class RefCallChecker:
    """Turns FENTRY_REF calls into References: `name, type [, "file"]`, the type parsed balanced."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._by_name: dict[str, Reference] = {}

    def _error(self, line: int, message: str) -> FentryError:
        return FentryError(f"{self._path}:{line}: {message}")

    def reference(self, call: MacroCall) -> Reference:
        # The type is one argument even when it holds commas: they are inside its
        # parentheses (int (int, const char *)), which the call finder keeps together.
        if len(call.args) not in (2, 3):
            raise self._error(
                call.line, f"{REF_MACRO} takes 2 or 3 arguments (name, type [, \"file.c\"]), "
                f"not {len(call.args)}; {REF_USAGE}")
        name_arg, type_arg = call.args[0], call.args[1]
        if len(name_arg) != 1 or name_arg[0].kind != "ident":
            raise self._error(
                call.line, f"the first argument of {REF_MACRO} must be the name of the program's "
                f"variable or function, not '{_spell(name_arg)}'; {REF_USAGE}")
        if not type_arg or any(t.kind == "string" for t in type_arg):
            raise self._error(
                call.line, f"the second argument of {REF_MACRO} must be the type of "
                f"{name_arg[0].text}, like long or int (const char *), not '{_spell(type_arg)}'; "
                f"{REF_USAGE}")
        file = None
        if len(call.args) == 3:
            arg = call.args[2]
            file = _decode_c_string(arg[0].text) if len(arg) == 1 and arg[0].kind == "string" else ""
            if not file:
                raise self._error(
                    call.line, f"the third argument of {REF_MACRO} must be the source file of "
                    f"{name_arg[0].text} in quotes, like \"parser.c\", not '{_spell(arg)}'; "
                    f"{REF_USAGE}")
        ref = Reference(name_arg[0].text, _spell_type(type_arg), file, call.line)
        earlier = self._by_name.get(ref.name)
        if earlier is not None:
            raise self._error(
                ref.line, f"{ref.spelled()} references {ref.name} again (line {earlier.line} "
                f"already does); {REF_MACRO} defines fentry_ref__{ref.name}, so a patch can "
                f"reference one thing per name: remove one of them")
        self._by_name[ref.name] = ref
        return ref


class OnceMacroChecker:
    """FENTRY_PRE_PATCH(fn) ... and FENTRY_REPLACE_ALL(): each at most once, with the right arguments."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: dict[str, int] = {}

    def _error(self, line: int, message: str) -> FentryError:
        return FentryError(f"{self._path}:{line}: {message}")

    def _once(self, call: MacroCall) -> None:
        earlier = self._seen.get(call.name)
        if earlier is not None:
            what = ("the patch is already cumulative" if call.name == REPLACE_ALL_MACRO else
                    f"a patch has one {CALLBACK_MACROS[call.name]} callback: call both "
                    "functions from one")
            raise self._error(
                call.line, f"{call.name} appears twice (line {earlier} already has it); {what}; "
                "remove one of them")
        self._seen[call.name] = call.line

    def callback(self, call: MacroCall) -> NameUse:
        if len(call.args) != 1 or len(call.args[0]) != 1 or call.args[0][0].kind != "ident":
            got = ", ".join(_spell(a) for a in call.args) or "nothing"
            raise self._error(
                call.line, f"{call.name} takes the name of one function of the patch, not "
                f"'{got}'; {USAGES[call.name]}")
        self._once(call)
        return NameUse(call.name, call.args[0][0].text, call.line)

    def replace_all(self, call: MacroCall) -> int:
        if call.args:
            raise self._error(
                call.line, f"{REPLACE_ALL_MACRO} takes no arguments, not "
                f"'{', '.join(_spell(a) for a in call.args)}'; {USAGES[REPLACE_ALL_MACRO]}")
        self._once(call)
        return call.line


def _original_use(call: MacroCall) -> OriginalUse | None:
    if not call.args or len(call.args[0]) != 1 or call.args[0][0].kind != "ident":
        return None  # malformed: the compiler says so, with the macro's own definition
    return OriginalUse(call.args[0][0].text, call.name, call.line)


def _var_use(call: MacroCall) -> NameUse | None:
    if len(call.args) != 1 or len(call.args[0]) != 1 or call.args[0][0].kind != "ident":
        return None  # malformed: left to the compiler
    return NameUse(call.name, call.args[0][0].text, call.line)


def parse_patch_text(text: str, path: Path) -> PatchSource:
    """Find the macro uses in `text`, the contents of the patch source `path`."""
    spliced, lines = splice_lines(text)
    tokens = list(Tokenizer(spliced, lines).tokens())
    replace_checker = ReplaceCallChecker(path)
    ref_checker = RefCallChecker(path)
    once_checker = OnceMacroChecker(path)
    replacements: list[Replacement] = []
    originals: list[OriginalUse] = []
    refs: list[Reference] = []
    var_uses: list[NameUse] = []
    callbacks: list[NameUse] = []
    replace_all_line: int | None = None
    for call in MacroCallFinder(path, tokens).calls():
        if call.name == REPLACE_MACRO:
            replacements.append(replace_checker.replacement(call))
        elif call.name == REF_MACRO:
            refs.append(ref_checker.reference(call))
        elif call.name in CALLBACK_MACROS:
            callbacks.append(once_checker.callback(call))
        elif call.name == REPLACE_ALL_MACRO:
            replace_all_line = once_checker.replace_all(call)
        elif call.name == VAR_MACRO:
            if (var := _var_use(call)) is not None:
                var_uses.append(var)
        elif (use := _original_use(call)) is not None:
            originals.append(use)
    if not replacements:
        raise FentryError(
            f"{path}: no {REPLACE_MACRO}(old, new) in this patch; add one per function it replaces, "
            f"e.g. {REPLACE_MACRO}(compute, compute_fixed);")
    _check_vars(path, refs, var_uses)
    return PatchSource(path, tuple(replacements), tuple(originals), tuple(refs), tuple(var_uses),
                       tuple(callbacks), replace_all_line)


def _check_vars(path: Path, refs: list[Reference], uses: list[NameUse]) -> None:
    """Every FENTRY_VAR(name) needs a FENTRY_REF(name, type): say so before the compiler does."""
    named = {r.name for r in refs}
    for use in uses:
        if use.name not in named:
            raise FentryError(
                f"{path}:{use.line}: {VAR_MACRO}({use.name}) but the patch has no "
                f"{REF_MACRO}({use.name}, type); add it at file scope, e.g. "
                f"{REF_MACRO}({use.name}, long);")


def parse_patch(path: Path) -> PatchSource:
    """Read and parse a patch source; FentryError (one line) if it cannot be read or is malformed."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise FentryError(f"cannot read the patch {path}: {e.strerror or e}; pass the patch's .c file") from None
    return parse_patch_text(text, path)
