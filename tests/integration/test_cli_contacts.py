"""`mailgate contact import`: bad files get a clear error and exit 1; good rows still land."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import CliError, Gateway, make_tenant

pytestmark = pytest.mark.integration


def import_csv(gateway: Gateway, tmp_path: Path, content: bytes, subaccount: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "contacts.csv"
    path.write_bytes(content)
    with pytest.raises(CliError) as failed:
        gateway.cli("contact", "import", str(path), "--subaccount", subaccount)
    return failed.value.doc


def test_import_rejects_a_non_utf8_file_naming_the_byte(gateway: Gateway, tmp_path: Path) -> None:
    tenant = make_tenant(gateway)
    doc = import_csv(gateway, tmp_path, b"email,name\nx@example.org,Jos\xe9\n", tenant.subaccount)
    assert doc["error"]["code"] == "csv_encoding"
    assert "0xe9" in doc["error"]["message"]
    listed = gateway.cli(
        "conversation", "show", "x@example.org", "--subaccount", tenant.subaccount, check=False
    )
    assert listed["error"]["code"] == "not_found"


def test_import_rejects_a_file_without_an_email_column(gateway: Gateway, tmp_path: Path) -> None:
    tenant = make_tenant(gateway)
    doc = import_csv(gateway, tmp_path, b"mail,fullname\na@example.org,A\n", tenant.subaccount)
    assert doc["error"]["code"] == "csv_header"
    assert "mail,fullname" in doc["error"]["message"]


def test_import_keeps_good_rows_reports_bad_lines_and_exits_1(
    gateway: Gateway, tmp_path: Path
) -> None:
    tenant = make_tenant(gateway)
    content = (
        f"email,name,assigned_user_email\nnew@example.org,New,{tenant.user_email}\nnot-an-email,X,\n"
    ).encode()
    doc = import_csv(gateway, tmp_path, content, tenant.subaccount)
    assert doc["created"] == 1
    assert [line for line, _ in doc["errors"]] == [3]
    shown = gateway.cli(
        "conversation", "show", "new@example.org", "--subaccount", tenant.subaccount
    )
    assert shown["contact"]["assigned_user_email"] == tenant.user_email
