"""doc/protocol.md stays true to the catalogue."""

from proto import doctable
from proto.codec import SPECS


def test_message_table_is_generated_from_the_catalogue():
    text = doctable.DOC.read_text()
    assert doctable.updated(text) == text, "run `python -m proto.doctable`"
    for spec in SPECS:
        assert f"| {spec.code} | {spec.name} |" in text
