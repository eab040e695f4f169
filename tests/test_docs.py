"""docs/ against the code: every config key documented with its current default, allowed values and
bound, no documented key that does not exist, and every `docs/<page>.md#anchor` link resolving. No Ray."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from sprec_ray import config
from sprec_ray.config import Rule, RunConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG_DOC = DOCS / "configuration.md"
OPERATIONAL_HEADING = "## Operational keys"
# `section.key`, optionally followed by ': value' or '=value' as prose writes settings
DOTTED = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+)(?:\s*[:=][^`]*)?`")
LINK = re.compile(r"\]\((?:(?P<page>[a-z_]+\.md))?#(?P<anchor>[a-z0-9_-]+)\)")
CODE_CITATION = re.compile(r"docs/(?P<page>[a-z_]+\.md)#(?P<anchor>[a-z0-9_-]+)")
FILE_SUFFIXES = ("py", "md", "yaml", "yml", "json", "jsonl", "parquet", "npy", "txt")
# an allowed cell that opens with a bound (">= 1", "> 0", "[0, 1)", "each >= 1"), which config.py must declare
BOUND_CELL = re.compile(r"(each )?(>=?|<=?) ?-?\d|[\[(]-?\d")


def named_keys(text: str, keys: dict[str, Any]) -> list[str]:
    """The `section.key` names in the text that no config key, retired key or section answers to
    (file names such as `selfplay.py` are not keys)."""
    sections = section_paths(keys)
    names = (m.group(1) for m in DOTTED.finditer(text))
    return [n for n in names if n.split(".")[0] in sections and n.rsplit(".", 1)[1] not in FILE_SUFFIXES
            and n not in keys and n not in sections and n not in config.RETIRED_KEYS]


def _fields(cls: type) -> list[tuple[str, Any, Any]]:
    """(name, type hint, default) of a config section: a dataclass, or a pydantic model should the
    sections move to one."""
    hints = typing.get_type_hints(cls)
    if dataclasses.is_dataclass(cls):
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append((f.name, hints[f.name], default))
        return out
    model_fields = getattr(cls, "model_fields", None)
    if model_fields is None:
        raise TypeError(f"{cls.__name__} is neither a dataclass nor a pydantic model")
    return [(name, hints[name], info.get_default(call_default_factory=True)) for name, info in model_fields.items()]


def _is_section(value: Any) -> bool:
    return dataclasses.is_dataclass(value) or hasattr(type(value), "model_fields")


def config_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Every leaf key as 'section.key' -> (type hint, default), walking nested sections."""
    keys: dict[str, tuple[Any, Any]] = {}
    for name, hint, default in _fields(cls):
        if _is_section(default):
            keys.update(config_keys(type(default), f"{prefix}{name}."))
        else:
            keys[prefix + name] = (hint, default)
    return keys


def config_rules(cls: type = RunConfig, prefix: str = "") -> dict[str, str]:
    """'section.key' -> the text of the bound declared on the field (`Annotated[int, at_least(1)]`)."""
    rules: dict[str, str] = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        if typing.get_origin(hint) is typing.Annotated:
            rules[prefix + name] = " and ".join(r.text for r in hint.__metadata__ if isinstance(r, Rule))
        elif dataclasses.is_dataclass(hint):
            rules.update(config_rules(hint, f"{prefix}{name}."))
    return rules


def section_paths(keys: dict[str, Any]) -> set[str]:
    """'sft', 'sft.cft', ...: every proper prefix of a key."""
    return {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def doc_rows(text: str) -> dict[str, list[str]]:
    """Table rows whose first cell is a backticked key: key -> [type, default, allowed, meaning]."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = _cells(line)
        key = cells[0].strip("`")
        if key in rows:
            raise AssertionError(f"configuration.md lists {key} twice")
        rows[key] = cells[1:]
    return rows


def problems(text: str, keys: dict[str, tuple[Any, Any]], operational: tuple[str, ...],
             rules: dict[str, str] | None = None) -> list[str]:
    """What is wrong with configuration.md's text against the config's keys and declared bounds; [] when
    it is right."""
    rules = config_rules() if rules is None else rules
    found: list[str] = []
    rows = doc_rows(text)
    for key, (hint, default) in keys.items():
        if key not in rows:
            found.append(f"{key}: not documented (add a row to docs/configuration.md)")
            continue
        cells = rows[key]
        if len(cells) != 4:
            found.append(f"{key}: row has {len(cells) + 1} cells, expected 5 (key, type, default, allowed, meaning)")
            continue
        try:
            documented = json.loads(cells[1].strip("`"))
        except json.JSONDecodeError:
            found.append(f"{key}: default cell {cells[1]!r} is not a JSON value")
            continue
        if documented != _plain(default) or type(documented) is not type(_plain(default)):
            found.append(f"{key}: documented default {cells[1]} but the code's is {json.dumps(_plain(default))}")
        if typing.get_origin(hint) is Literal:
            missing = [v for v in typing.get_args(hint) if f"`{json.dumps(v)}`" not in cells[2]]
            if missing:
                found.append(f"{key}: allowed values {missing} are not in the allowed cell {cells[2]!r}")
        found += bound_problems(key, cells[2], rules.get(key))
    for key in rows:
        if key not in keys:
            found.append(f"{key}: documented, but no such config key")
    found += [f"{name}: named in the text, but no such config key" for name in named_keys(text, keys)]
    head, _, rest = text.partition(OPERATIONAL_HEADING)
    if not rest:
        found.append(f"no '{OPERATIONAL_HEADING}' section")
    else:
        listed = set(re.findall(r"`([a-z_.]+)`", rest.split("\n## ")[0]))
        if listed != set(operational):
            found.append(f"operational keys listed {sorted(listed)} but config.OPERATIONAL_KEYS is {sorted(operational)}")
    return found


def bound_problems(key: str, cell: str, declared: str | None) -> list[str]:
    """The allowed cell opens with the bound config.py declares on the field (">= 1" but not ">= 10"),
    and with no bound where none is declared."""
    if declared is None:
        return [f"{key}: allowed cell {cell!r} states a bound, but config.py declares none"] if BOUND_CELL.match(cell) else []
    if not re.match(re.escape(declared) + r"(?![\w.])", cell):
        return [f"{key}: allowed cell {cell!r} must open with the declared bound {declared!r}"]
    return []


def test_configuration_doc_matches_the_config():
    found = problems(CONFIG_DOC.read_text(), config_keys(), config.OPERATIONAL_KEYS)
    assert not found, "docs/configuration.md is out of date:\n" + "\n".join(found)


def test_the_check_fails_on_an_undocumented_or_stale_key():
    keys = config_keys()
    text = CONFIG_DOC.read_text()
    assert problems(text, keys, config.OPERATIONAL_KEYS) == []
    # a key added to the config without a row
    added = {**keys, "train.new_knob": (int, 3)}
    assert any(p.startswith("train.new_knob: not documented") for p in problems(text, added, config.OPERATIONAL_KEYS))
    # a key removed from the config but still documented
    removed = {k: v for k, v in keys.items() if k != "dpo.beta"}
    assert any(p.startswith("dpo.beta: documented") for p in problems(text, removed, config.OPERATIONAL_KEYS))
    # a changed default
    changed = {**keys, "sft.lr": (float, 1e-3)}
    assert any(p.startswith("sft.lr: documented default") for p in problems(text, changed, config.OPERATIONAL_KEYS))
    # a new allowed value
    grown = {**keys, "dpo.loss": (Literal["dpo", "sdpo", "ipo"], "dpo")}
    assert any(p.startswith("dpo.loss: allowed values ['ipo']") for p in problems(text, grown, config.OPERATIONAL_KEYS))
    # a key named in prose that does not exist
    prose = text + "\nSee `train.no_such_key` too.\n"
    assert any(p.startswith("train.no_such_key: named") for p in problems(prose, keys, config.OPERATIONAL_KEYS))
    # an operational key added in the code only
    assert any("operational keys" in p for p in problems(text, keys, (*config.OPERATIONAL_KEYS, "train.use_gpu")))


def test_the_check_fails_on_a_stale_or_undeclared_bound():
    keys, rules, text = config_keys(), config_rules(), CONFIG_DOC.read_text()
    assert rules["data.max_history"] == ">= 1" and rules["sft.cft.beta"] == "[0, 1]" and rules["eval.ks"] == "each >= 1"
    # a bound changed in config.py but not on the page
    changed = {**rules, "data.max_history": ">= 2"}
    assert any(p.startswith("data.max_history: allowed cell") for p in problems(text, keys, config.OPERATIONAL_KEYS, changed))
    # a bound on the page that config.py no longer declares
    dropped = {k: v for k, v in rules.items() if k != "lora.r"}
    assert any(p.startswith("lora.r: allowed cell '>= 1' states a bound")
               for p in problems(text, keys, config.OPERATIONAL_KEYS, dropped))
    assert bound_problems("k", ">= 10", ">= 1") and not bound_problems("k", ">= 1; and more", ">= 1")


def test_config_keys_walks_nested_sections():
    keys = config_keys()
    assert keys["sft.cft.beta"] == (float, RunConfig().sft.cft.beta)
    assert "sft.cft" not in keys and "sft" not in keys and "seed" in keys
    assert {"data", "sft", "sft.cft", "serve"} <= section_paths(keys)


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_doc_links_and_keys_resolve(page):
    """Links between the docs land on a heading, and every `section.key` the page names exists."""
    text = (DOCS / page).read_text()
    bad = []
    for match in LINK.finditer(text):
        target = DOCS / (match.group("page") or page)
        if not target.is_file() or match.group("anchor") not in anchors(target):
            bad.append(f"link {match.group(0)}")
    bad += [f"key `{name}`" for name in named_keys(text, config_keys())]
    assert not bad, f"docs/{page}: " + ", ".join(bad)


def test_code_citations_of_the_docs_resolve():
    """`docs/method.md#section` in the package's comments names a section that exists."""
    bad = []
    for path in sorted((ROOT / "sprec_ray").rglob("*.py")):
        for match in CODE_CITATION.finditer(path.read_text()):
            page = DOCS / match.group("page")
            if not page.is_file() or match.group("anchor") not in anchors(page):
                bad.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert not bad, "citations of missing doc sections:\n" + "\n".join(bad)


def test_method_doc_has_the_sections_code_cites():
    """The anchors the package's comments are to cite (issue 36) exist in docs/method.md."""
    expected = {"prompts-and-responses", "the-sprec-round", "objectives-and-normalisation", "dpo-and-s-dpo", "cft",
                "self-play-negatives", "prefix-sharing", "streaming-large-sft-stages", "grounding", "metrics",
                "candidate-task-metrics"}
    assert expected <= anchors(DOCS / "method.md")
