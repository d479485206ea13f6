"""The README's promises: the two quick-start commands and a configuration table in sync."""

from pathlib import Path

from lake.config import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_shows_the_two_quick_start_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text


def test_readme_configuration_table_matches_the_settings_model():
    text = README.read_text()
    start = text.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = text.index("<!-- config-table:end -->")
    assert text[start:end].strip() == settings_table().strip(), (
        "README configuration table is stale: regenerate it with `python -m lake.config`"
    )
