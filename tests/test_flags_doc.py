"""`megatron-moe-ext flags --markdown` is the plugin's flags reference, read from the argument parser;
docs/flags.md must be exactly its output (regenerate: megatron-moe-ext flags --markdown > docs/flags.md)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
from pathlib import Path

from megatron_moe_ext.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "flags.md"


def _flags_output(*args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["flags", *args]) == 0
    return out.getvalue()


def test_docs_flags_md_is_the_generated_reference():
    generated = _flags_output("--markdown")
    assert DOC.read_text() == generated, (
        "docs/flags.md differs from `megatron-moe-ext flags --markdown`; regenerate it with "
        "`megatron-moe-ext flags --markdown > docs/flags.md`.")


def test_every_parser_flag_has_one_row_with_its_help():
    from megatron_moe_ext.args import add_moe_ext_args
    from megatron_moe_ext.config import MoEExtConfig, flag_name

    parser = argparse.ArgumentParser()
    add_moe_ext_args(parser)
    doc = _flags_output("--markdown")
    rows = [line for line in doc.splitlines() if line.startswith("| `--")]
    assert len(rows) == len(dataclasses.fields(MoEExtConfig)) + 1          # + the entry-only --cpu
    for f in dataclasses.fields(MoEExtConfig):
        row = [r for r in rows if r.startswith(f"| `{flag_name(f)}`")]
        assert len(row) == 1, flag_name(f)
        action = next(a for a in parser._actions if flag_name(f) in a.option_strings)
        first_words = " ".join(action.help.split()[:4]).replace("|", "\\|")
        assert first_words in row[0], flag_name(f)
    locmoe_mu = next(r for r in rows if r.startswith("| `--moe-locmoe-mu`"))
    assert "\\|\\|" in locmoe_mu and locmoe_mu.count(" | ") == 4            # pipes in help are escaped
    assert "| locmoe, locmoe-plus |" in locmoe_mu


def test_plain_text_listing():
    text = _flags_output()
    assert text.startswith("--moe-router-policy {topk,c2r,locmoe,locmoe-plus}\n")
    assert "--moe-ext-metrics / --no-moe-ext-metrics\n    default on" in text


def test_readme_links_the_reference_instead_of_a_table():
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "[docs/flags.md](docs/flags.md)" in readme
    assert "| `--moe-router-policy" not in readme                            # no hand-written flag table
    for page in ("docs/troubleshooting.md", "docs/choosing-a-policy.md", "docs/flags.md"):
        assert (DOC.parents[1] / page).is_file() and f"]({page})" in readme
