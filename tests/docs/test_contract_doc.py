"""docs/CONTRACT.md is the contract a client in another language is written against: it must name everything the
protos and the server's error table define, and every mention of it must lead to it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jobstate.server import errors
from jobstate.v1 import job_state_pb2, job_state_service_pb2

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "docs" / "CONTRACT.md"
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_contract_is_in_the_repository() -> None:
    assert CONTRACT.is_file()


def test_every_mention_of_the_contract_is_a_link_to_it() -> None:
    for doc in DOCS:
        text = doc.read_text()
        links = [(m.start(), m.end(), m.group(1)) for m in re.finditer(r"\[[^\]]*\]\(([^)\s]*)\)", text)]
        for m in re.finditer(r"CONTRACT\.md", text):
            around = text[max(0, m.start() - 40) : m.end() + 5]
            link = next((target for a, b, target in links if a <= m.start() < b), None)
            assert link is not None, f"{doc.name}: '{around}' is not a link to docs/CONTRACT.md"
            assert (doc.parent / link.split("#")[0]).resolve() == CONTRACT, (
                f"{doc.name}: link {link} does not lead to the contract"
            )


def _words() -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", CONTRACT.read_text()))


def test_every_rpc_request_field_and_message_is_named() -> None:
    words = _words()
    service = job_state_service_pb2.DESCRIPTOR.services_by_name["JobStateService"]
    missing = []
    for method in service.methods:
        missing += [method.name] if method.name not in words else []
        missing += [f"{method.name}.{f.name}" for f in method.input_type.fields if f.name not in words]
    for message in (job_state_pb2.JobState, job_state_pb2.ExecutionState, job_state_service_pb2.WatchEvent):
        missing += [f.name for f in message.DESCRIPTOR.fields if f.name not in words]
    assert not missing, f"docs/CONTRACT.md does not name {missing}"


def test_every_enum_value_is_named() -> None:
    text = CONTRACT.read_text()
    missing = []
    for module in (job_state_pb2, job_state_service_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
            for value in enum.values:
                short = "_" + value.name.removeprefix(prefix)
                if value.name not in text and f"`{short}`" not in text:
                    missing.append(value.name)
    assert not missing, f"docs/CONTRACT.md does not name {missing}"


def test_every_error_reason_and_its_metadata_is_in_the_table() -> None:
    text = CONTRACT.read_text()
    table = text[text.index("## Errors") :]
    reasons = {
        cls.reason for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.JobStateError)
    }
    reasons.discard("INTERNAL")
    missing = [r for r in sorted(reasons) if f"`{r}`" not in table]
    assert not missing, f"the error table lacks {missing}"
    for key in (
        "current_version",
        "oldest_revision",
        "resume_revision",
        "store_id",
        "limit",
        "field",
        "retry_after_ms",
    ):
        assert f"`{key}`" in table


def test_the_store_id_header_is_the_one_the_server_sends() -> None:
    from jobstate.server.service import STORE_ID_KEY

    assert f"`{STORE_ID_KEY}`" in CONTRACT.read_text()


def check_error_table(table: str, grpc: int, connect: int, http: int, reason: int) -> None:
    """Each reason's gRPC code, Connect code and HTTP status in a Markdown error table (the columns given) are
    those of the server's one table (``service.ERRORS``); a row naming two reasons ("A / B") gives each its own
    codes in the same order."""
    from jobstate.server.service import ERRORS

    wire = {cls.reason: w for cls, w in ERRORS.items()}
    checked = set()
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        grpc_codes = re.findall(r"`([A-Z_]+)`", cells[grpc])
        connect_codes = re.findall(r"`([a-z_]+)`", cells[connect])
        statuses = [int(n) for n in re.findall(r"\b\d{3}\b", cells[http])]
        reasons = [r for r in re.findall(r"`([A-Z_]+)`", cells[reason]) if r in wire]
        for i, name in enumerate(reasons):

            def pick(values: list[Any], i: int = i) -> Any:
                return values[i] if len(values) > 1 else values[0]

            w = wire[name]
            assert (pick(grpc_codes), pick(connect_codes), pick(statuses)) == (w.grpc.name, w.connect, w.http), row
            checked.add(name)
    assert checked == set(wire), f"the table has no row for {set(wire) - checked}"


def _table_after(text: str, header: str) -> str:
    start = text.index(header)
    return text[start : text.index("\n\n", start)]


def test_the_error_table_says_what_the_server_sends() -> None:
    table = _table_after(CONTRACT.read_text(), "| when | gRPC code | Connect code | HTTP status | reason (metadata) |")
    check_error_table(table, grpc=1, connect=2, http=3, reason=4)


def test_the_readme_error_table_says_what_the_server_sends() -> None:
    table = _table_after((ROOT / "README.md").read_text(), "| when | gRPC code | Connect code, HTTP status | reason |")
    check_error_table(table, grpc=1, connect=2, http=2, reason=3)
