"""The library and its applications name no model family: what differs between families is
declared by their integration (``integrations/``) and read from it (docs/integrations.md s.1).

Scanned: every .py file under ``memflow_adapter/`` (engine, pipeline, hub), ``memflow_apps/``
(cli, eval, world, the shared tiny models) and ``recipes/``. Not scanned: ``integrations/``
(where families live), ``bench/`` (benchmarks measure named models) and ``tests/``. Only code
is read, names and string literals: comments and docstrings may cite a family as an example or
as the reference the protocol was published on, since they change no behaviour.

A family name counts as a word inside identifiers too (``tiny_wan``, ``WanTransformer3DModel``,
``AutoencoderKLWan``): its edges are a case change, an underscore, a digit or a non-letter.
Every remaining use is listed in ``ALLOWED`` with why; a new one fails, and so does an entry
that no longer matches anything.
"""

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("memflow_adapter", "memflow_apps", "recipes")
FAMILY = re.compile(
    r"(?<![A-Za-z])(?:wan|skyreels|helios)(?![a-z])"
    r"|(?<![a-z])(?:Wan|SkyReels|Helios)(?![a-z])"
    r"|(?<![A-Z])(?:WAN|SKYREELS|HELIOS)(?![A-Z])"
)
TINY = "the tiny random-weight test and demo model, a Wan built from Wan2.1's config"
WORLD = "the narrative world's model is diffusers' WanTransformer3DModel by design"

#: ``(file, text, reason)``: a code token of ``file`` holding ``text`` may name a family
#: (``text`` ``"*"``: every token of the file).
ALLOWED = (
    ("memflow_apps/shared/tiny_wan.py", "*", TINY),
    ("memflow_apps/cli/main.py", "tiny_wan", TINY),
    ("memflow_apps/cli/main.py", "tiny Wan2.1-architecture", TINY),
    ("memflow_apps/cli/main.py", "tiny random-weight Wan", TINY),
    ("memflow_apps/eval/cli.py", "tiny_wan", TINY),
    ("memflow_apps/shared/tiny_scorers.py", "tiny_wan", TINY + " (its tokenizer)"),
    ("recipes/build_dataset.py", "tiny_wan", TINY),
    ("recipes/models.py", "tiny_wan", TINY),
    ("recipes/models.py", "tiny-wan-random", TINY + " (the base its adapters record)"),
    ("memflow_apps/world/pipeline.py", "*", WORLD),
    ("memflow_apps/world/demo.py", "Wan transformer", WORLD),
    ("memflow_apps/shared/cli_choices.py", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
     "a light mirror of the reference family's published base for --help (no torch); "
     "tests/test_cli.py checks it against the integration"),
    ("recipes/streaming_long_tuning.py", "Wan-AI/Wan2.1-T2V-14B-Diffusers",
     "the paper's DMD teacher, the recipe's default teacher Hub id"),
)


def code_tokens(source: str) -> list[tokenize.TokenInfo]:
    """Names and string literals of ``source``, without comments and docstrings (a string that
    is a statement of its own)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.COMMENT, tokenize.NL)]
    statement_edges = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    kept = []
    for i, token in enumerate(tokens):
        if token.type not in (tokenize.NAME, tokenize.STRING):
            continue
        alone = (i == 0 or tokens[i - 1].type in statement_edges) and (
            i + 1 < len(tokens) and tokens[i + 1].type in (tokenize.NEWLINE, tokenize.ENDMARKER)
        )
        if not (token.type == tokenize.STRING and alone):
            kept.append(token)
    return kept


def family_names() -> list[tuple[str, int, str]]:
    """``(file, line, token)`` of every code token naming a family."""
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            for token in code_tokens(path.read_text(encoding="utf-8")):
                if FAMILY.search(token.string):
                    found.append((name, token.start[0], token.string))
    return found


def allowed(name: str, token: str) -> bool:
    return any(name == file and (text == "*" or text in token) for file, text, _ in ALLOWED)


def test_only_the_allowed_code_names_a_model_family():
    unexplained = [f"{name}:{line}: {token[:80]}" for name, line, token in family_names()
                   if not allowed(name, token)]
    assert unexplained == [], "declare it on the Integration, or add it to ALLOWED with a reason"


def test_every_allowed_entry_is_still_needed():
    found = family_names()
    stale = [(file, text) for file, text, _ in ALLOWED
             if not any(name == file and (text == "*" or text in token)
                        for name, _, token in found)]
    assert stale == []


def test_the_scan_sees_names_in_identifiers_and_strings_but_not_in_prose():
    source = (
        '"""A Wan docstring."""\n'
        "# a Helios comment\n"
        "from diffusers import WanTransformer3DModel, AutoencoderKLWan\n"
        "family = 'skyreels_v2'\n"
        "build_tiny_wan_pipeline, swan, wander, WANT = 1, 2, 3, 4\n"
    )
    named = [t.string for t in code_tokens(source) if FAMILY.search(t.string)]
    assert named == ["WanTransformer3DModel", "AutoencoderKLWan", "'skyreels_v2'",
                     "build_tiny_wan_pipeline"]
