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


def test_readme_example_ids_have_events_in_the_sample_data():
    """The client examples' user has events in the default synthetic sample (so `--explain`
    shows "because" items) and their items exist in its catalogue."""
    import re

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
