"""One-line config errors with the nearest real key, for every jsonargparse parser of `mmtune`.

jsonargparse reports a bad value as a tree of text: `Parser key "model":` / `Problem with given
class_path 'mmtune.X':` / `Option 'lernig_rate' is not accepted`, each union alternative tried
(`Expected a <class 'NoneType'>`), and `Given value: NestedArg(...)`, after the whole usage. The
exception objects do not keep that structure (union errors are joined into strings), so the tree is
read here: the dotted key is rebuilt from the `Parser key` and `class_path` levels, and the nearest
key is looked up among the keys the parser (and the named class's signature) really has. A message
that matches none of the known shapes still comes out as one line, its first meaningful one.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Optional

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':\s*$")
_GROUP_OPTION = re.compile(r"^Group '([^']+)' does not accept option '([^']+)'")
_SUBCOMMAND_OPTION = re.compile(r"^Subcommand '[^']+' does not accept option '([^']+)'")
_OPTION = re.compile(r"^Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"^Expected an? (.+?)(?:\. Got value: (.*))?$")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$", re.IGNORECASE)
_IMPORT_PATH = re.compile(r"^Expected a dot import path string: (.*)$")
_TYPE_NAME = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
# Names other tools use for a key mmtune calls differently: a misspelling of one of them points to
# mmtune's key (`lernig_rate` -> `optimizer.lr`) when no key of its own is close.
_OTHER_NAMES = {"learning_rate": "lr", "lr_rate": "lr", "epochs": "max_epochs", "num_epochs": "max_epochs",
                "steps": "max_steps", "num_steps": "max_steps", "rank": "r", "lora_r": "r", "lora_rank": "r",
                "lora_alpha": "alpha", "lora_dropout": "dropout", "bs": "batch_size", "workers": "num_workers"}
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
          "Given value:")


def _type_name(text: str) -> str:
    """`<class 'int'>` -> `int`, `typing.Tuple[float, float, float]` stays readable."""
    return _TYPE_NAME.sub(lambda m: m.group(1), text).replace("typing.", "").strip()


def _lines(message: str) -> list[tuple[int, str]]:
    out = []
    for raw in message.splitlines():
        text = raw.strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip())
        if text.startswith("- "):
            text, indent = text[2:], indent + 2
        out.append((indent, text))
    return out


def _findings(message: str) -> list[tuple[str, str, dict]]:
    """(kind, dotted key, details) for each leaf error of the tree, in order."""
    found: list[tuple[str, str, dict]] = []
    stack: list[tuple[int, str]] = []  # (indent, key part)
    given = None
    for indent, text in _lines(message):
        while stack and stack[-1][0] >= indent:
            stack.pop()
        prefix = ".".join(part for _, part in stack if part)
        join = (lambda key: f"{prefix}.{key}" if prefix else key)
        if text.startswith("Given value:"):
            given = text[len("Given value:"):].strip()
            continue
        if (m := _PARSER_KEY.match(text)):
            key = m.group(1)
            stack.append((indent, key))
            if m.group(2):  # `Parser key "k": the error` on one line
                rest = m.group(2)
                if (e := _EXPECTED.match(rest)) and e.group(2) is not None:
                    found.append(("type", join(key), {"expected": _type_name(e.group(1)), "value": e.group(2)}))
                else:
                    found.append(("other", join(key), {"text": rest}))
            continue
        if (m := _CLASS_PATH.match(text)):
            stack.append((indent, "init_args"))
            found.append(("class", prefix, {"class_path": m.group(1)}))
            continue
        if (m := _GROUP_OPTION.match(text)):
            found.append(("unknown", join(f"{m.group(1)}.{m.group(2)}"), {"parent": prefix}))
        elif (m := _SUBCOMMAND_OPTION.match(text)) or (m := _OPTION.match(text)):
            found.append(("unknown", join(m.group(1)), {"parent": prefix}))
        elif (m := _IMPORT_PATH.match(text)):
            found.append(("class_name", prefix, {"value": m.group(1)}))
        elif (m := _UNRECOGNIZED.match(text)):
            for flag in m.group(1).split():
                if flag.startswith("--"):
                    found.append(("unknown", flag[2:].split("=")[0], {"parent": ""}))
        elif (m := _EXPECTED.match(text)):
            if "NoneType" in m.group(1) and m.group(2) is None:
                continue  # the `None` alternative of an Optional: not what the user meant
            found.append(("type", prefix, {"expected": _type_name(m.group(1)), "value": m.group(2)}))
        elif not text.startswith(_NOISE):
            found.append(("other", prefix, {"text": text}))
    for kind, _, details in found:
        if kind == "type" and details["value"] is None:
            details["value"] = given
    return found


def nearest(key: str, known: Iterable[str], parent: str = "") -> Optional[str]:
    """The real key closest to a misspelled one: the path below `parent` compared first, then the last
    name alone (`adapter.rank` -> `adapter.r`; `trainr.max_epochs` -> `trainer.max_epochs`)."""
    known = sorted(set(known))
    base = f"{parent}." if parent else ""
    below = {k[len(base):]: k for k in known if k.startswith(base) and k != key}
    rel = key[len(base):] if key.startswith(base) else key
    match = difflib.get_close_matches(rel, list(below), n=1, cutoff=0.75)
    if match:
        return below[match[0]]
    leaves: dict[str, str] = {}
    for sub, full in below.items():
        leaves.setdefault(sub.rsplit(".", 1)[-1], full)
    leaf = rel.rsplit(".", 1)[-1]
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.7)
    if match:
        return leaves[match[0]]
    other = difflib.get_close_matches(leaf, list(_OTHER_NAMES), n=1, cutoff=0.75)
    if other:
        ours = _OTHER_NAMES[other[0]]
        candidates = [k for k in known if k.rsplit(".", 1)[-1] == ours]
        under = [k for k in candidates if k.startswith(base)]
        return min(under or candidates, key=len) if (under or candidates) else None
    return None


def class_keys(class_path: str, prefix: str) -> list[str]:
    """The dotted keys a class takes as `init_args` (nested dataclass fields included), under `prefix`."""
    try:
        from jsonargparse import ArgumentParser
        from jsonargparse._util import import_object

        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(import_object(class_path), fail_untyped=False, sub_configs=True)
    except Exception:  # noqa: BLE001 - suggestions are a courtesy; the error is reported without them
        return []
    return [f"{prefix}.{key}" if prefix else key for key in parser_keys(parser)]


def parser_keys(parser) -> list[str]:
    """Every dotted key a jsonargparse parser accepts (its actions' destinations)."""
    skip = {"help", "config", "print_config", "subcommand"}
    return [a.dest for a in parser._actions if a.dest and a.dest not in skip and not a.dest.startswith("__")]


def one_line(message: str, known: Iterable[str] = ()) -> str:
    """The first error of a jsonargparse message as one line: an unknown key with the nearest real key
    (`known`, plus the keys of each class_path named in the message), or a key with its value and the
    type it expects."""
    found = _findings(message)
    known = list(known)
    for kind, key, details in found:
        if kind == "class":
            known += class_keys(details["class_path"], f"{key}.init_args" if key else "init_args")
    for kind, key, details in found:
        if kind == "unknown":
            hint = nearest(key, known, details["parent"])
            return f"unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
    for kind, key, details in found:
        if kind == "type":
            return f"invalid value {details['value']!r} for '{key}': expected {details['expected']}"
        if kind == "class_name":
            import mmtune

            names = [n for n in mmtune.__all__ if n.endswith(("Task", "Data"))]
            near = difflib.get_close_matches(details["value"].rsplit(".", 1)[-1], names, n=1, cutoff=0.6)
            hint = f"; did you mean '{near[0]}'?" if near else f" (mmtune's: {', '.join(names)}, or an import path)"
            return f"unknown class_path {details['value']!r} for '{key}'{hint}"
    for kind, key, details in found:
        if kind == "other":
            text = details["text"]
            return f"--{key}: {text}" if key else text
    return message.strip().splitlines()[0] if message.strip() else "invalid arguments"


_SEQUENCE_TYPES = ("tuple", "list", "Tuple", "List", "Sequence", "set")


def with_list_brackets(message: str, argv: list[str]) -> Optional[list[str]]:
    """`argv` with a bare comma list (`--split 0.6,0.1,0.3`) bracketed (`[0.6,0.1,0.3]`), when the
    error says that flag's type wanted a list or tuple; None when the error is not that.

    Why in the error path: the usage line shows `--split [ITEM,...]`, and users type the list without
    brackets; turning every comma string into a list up front would also split the values of
    plain string options. Here only a value already refused as "not a list" is retried."""
    for kind, _key, details in _findings(message):
        value = details.get("value")
        if kind != "type" or not value or "," not in value or value.lstrip().startswith(("[", "(", "{")):
            continue
        if not details["expected"].startswith(_SEQUENCE_TYPES):
            continue
        for i, arg in enumerate(argv):
            if arg == value:
                return [*argv[:i], f"[{value}]", *argv[i + 1:]]
            if arg.startswith("--") and arg.endswith(f"={value}"):
                return [*argv[:i], f"{arg[:-len(value)]}[{value}]", *argv[i + 1:]]
    return None


def parse_or_explain(parser, argv: list[str], instantiate: bool = False):
    """`parser.parse_args(argv)` (and `instantiate`) for the plain verbs' parsers (`export`, `report`,
    `data align`), with any parse error raised as a one-line ConfigError naming the verb and the key.
    `--help` still prints the usage and exits."""
    from jsonargparse import ArgumentError

    from mmtune.errors import ConfigError

    parser.exit_on_error = False
    argv = list(argv)
    while True:
        try:
            cfg = parser.parse_args(argv)
            return (cfg, parser.instantiate(cfg)) if instantiate else cfg
        except ArgumentError as err:
            retry = with_list_brackets(str(err), argv)
            if retry is not None:
                argv = retry
                continue
            line = one_line(str(err), parser_keys(parser))
        raise ConfigError(f"{parser.prog.removeprefix('mmtune ')}: {line} ({parser.prog} --help)") from None
