"""The client CLI's bad input: one line naming the file, the line and the key; exit 2; no
traceback and no call made (the target below listens nowhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lambdarec_client.cli import main

NOWHERE = {"LAMBDAREC__SERVER__HOST": "127.0.0.1", "LAMBDAREC__SERVER__PORT": "9"}


@pytest.mark.parametrize(("line", "message"), [
    ('{"user": "u6"}', "requests.jsonl:2: unknown field 'user' (known: user_id, k,"),
    ('{"user_id": "u6", "k": "five"}', 'requests.jsonl:2: k: expected integer, got "five"'),
    ('{"user_id": "u6", "explain": 1}', "requests.jsonl:2: explain: expected boolean, got 1"),
    ('{"user_id": "u6", "exclude_item_ids": "i1"}',
     'requests.jsonl:2: exclude_item_ids: expected list of text, got "i1"'),
    ('["u6"]', "requests.jsonl:2: expected a JSON object, got list"),
])
def test_recommend_batch_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   line: str, message: str) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text('{"user_id": "u5", "k": 5}\n' + line + "\n")
    assert main(["recommend-batch", "--file", str(path)], env=NOWHERE) == 2
    out = capsys.readouterr()
    assert out.out == ""
    err = out.err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
