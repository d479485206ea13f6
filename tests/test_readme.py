"""The README's promises (the two commands, client examples that work on the sample data, a
front door that stays one) and the configuration reference in sync with the settings."""

import re
from pathlib import Path

from lake.config import settings_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"


def test_readme_shows_the_two_quick_start_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text


def test_readme_is_a_front_door_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert len([t for t in links if t.startswith("docs/")]) >= 4
    for target in links:
        assert (ROOT / target).is_file(), target


def test_configuration_table_matches_the_settings_model():
    text = CONFIGURATION.read_text()
    start = text.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = text.index("<!-- config-table:end -->")
    assert text[start:end].strip() == settings_table().strip(), (
        "docs/configuration.md's table is stale: regenerate it with `python -m lake.config`"
    )


def test_readme_example_ids_have_events_in_the_sample_data():
    """The README's client examples' user has events in the default synthetic sample (so `--explain`
    shows "because" items) and their items exist in its catalogue."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from lake.config import load_settings
    from lake.synthetic import generate

    text = README.read_text()
    block = text[text.index("**Client.**"):]
    block = block[block.index("```bash"):block.index("```", block.index("```bash") + 3)]
    users = set(re.findall(r"\b(u\d+)\b", block))
    items = set(re.findall(r"\b(i\d+)\b", block))
    assert users and items
    d = load_settings(env={}).data
    events = pa.concat_tables(generate(d.synthetic_events, d.synthetic_users,
                                       d.synthetic_items, d.seed))
    counts = events.group_by("user_id").aggregate([("item_id", "count")])
    per_user = dict(zip(counts.column("user_id").to_pylist(),
                        counts.column("item_id_count").to_pylist(), strict=True))
    for u in users:
        assert per_user.get(u, 0) >= 5, f"README user {u} has {per_user.get(u, 0)} events"
    known = set(pc.unique(events.column("item_id")).to_pylist())
    assert items <= known, sorted(items - known)
