"""Edge cases of header normalisation: addresses, Message-IDs, dates, encoded-words."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ingest.charsets import (
    BAD_ENCODED_WORD,
    UNDECLARED_8BIT,
    UNDECODABLE_CHARSET,
    decode_bytes,
    decode_words,
    fix_8bit_header,
)
from ingest.normalise import (
    BAD_ADDRESS,
    MALFORMED_MESSAGE_ID,
    NAIVE_DATE,
    address_key,
    normalise_message_id,
    parse_addresses,
    parse_date,
    parse_date_with_defects,
    parse_message_ids,
)

# ------------------------------------------------------------- addresses


def _specs(value: str) -> list[str]:
    return [a.addr_spec for a in parse_addresses(value)[0]]


def _kinds(defects: tuple[object, ...]) -> set[str]:
    return {getattr(d, "kind", "") for d in defects}


@pytest.mark.parametrize(
    "crafted",
    [
        # CVE-2023-27043 and its variants (gh-102988): one parser reads the
        # first address, another the second; we must never return just one.
        "a@example.org<<b@example.com>",
        "alice@example.org)<bob@example.org>",
        "alice@example.org)<<bob@example.org>",
        "a@example.org[b@example.com]",
        "a@b@c.org",
    ],
)
def test_r15_crafted_from_never_yields_one_wrong_address(crafted: str) -> None:
    addresses, defects = parse_addresses(crafted)
    specs = [a.addr_spec for a in addresses]
    assert len(specs) != 1, specs
    if not specs:
        assert BAD_ADDRESS in _kinds(defects)


def test_crafted_double_angle_yields_both_with_defect() -> None:
    addresses, defects = parse_addresses("a@example.org<<b@example.com>")
    assert [a.addr_spec for a in addresses] == ["a@example.org", "b@example.com"]
    assert BAD_ADDRESS in _kinds(defects)


def test_quoted_display_name_with_at_sign_is_not_an_address() -> None:
    assert _specs('"alice@example.org" <bob@example.org>') == ["bob@example.org"]


def test_comma_inside_quoted_name_does_not_split() -> None:
    addresses, defects = parse_addresses('"Doe, John" <j@x.org>, k@y.org')
    assert [(a.display_name, a.addr_spec) for a in addresses] == [
        ("Doe, John", "j@x.org"),
        ("", "k@y.org"),
    ]
    assert defects == ()


def test_group_syntax_is_flattened_and_empty_group_is_clean() -> None:
    assert _specs("team: a@b.org, c@d.org;") == ["a@b.org", "c@d.org"]
    assert parse_addresses("undisclosed-recipients:;") == ((), ())


def test_encoded_word_display_name_is_decoded_also_inside_quotes() -> None:
    plain = parse_addresses("=?utf-8?Q?J=C3=B6rg?= <j@x.de>")[0]
    quoted = parse_addresses('"=?utf-8?Q?J=C3=B6rg?=" <j@x.de>')[0]
    assert plain[0].display_name == quoted[0].display_name == "Jörg"


def test_address_without_domain_is_dropped_with_defect() -> None:
    addresses, defects = parse_addresses("Moderator-Address")
    assert addresses == ()
    assert BAD_ADDRESS in _kinds(defects)


def test_name_and_address_without_brackets_is_recovered_with_defect() -> None:
    addresses, defects = parse_addresses("Ruixin Wang wangruixin@CAICT.AC.CN")
    assert [(a.display_name, a.addr_spec) for a in addresses] == [
        ("Ruixin Wang", "wangruixin@CAICT.AC.CN")
    ]
    assert BAD_ADDRESS in _kinds(defects)


def test_comment_address_form() -> None:
    assert _specs("barry@python.org (Barry A. Warsaw)") == ["barry@python.org"]


def test_unbalanced_parenthesis_yields_nothing() -> None:
    addresses, defects = parse_addresses("x@y.org (broken")
    assert addresses == ()
    assert BAD_ADDRESS in _kinds(defects)


def test_trailing_comma_list_keeps_every_address() -> None:
    assert _specs("x@y.co,\n x@z.co,") == ["x@y.co", "x@z.co"]


def test_deeply_nested_address_list_does_not_raise() -> None:
    value = "a" + ":" * 5000 + "b@c.org"
    addresses, _defects = parse_addresses(value)
    assert isinstance(addresses, tuple)


# ----------------------------------------------------------- address_key


def test_address_key_casefolds_local_and_domain() -> None:
    assert address_key("John.Doe@Example.COM") == "john.doe@example.com"


def test_address_key_decodes_idna_domain() -> None:
    assert address_key("info@xn--bcher-kva.example") == "info@bücher.example"
    assert address_key("info@BÜCHER.example") == "info@bücher.example"


def test_address_key_applies_nfc_and_casefold_to_local_part() -> None:
    decomposed = "Jo\u0308rg@example.org"  # o + combining diaeresis
    assert address_key(decomposed) == "jörg@example.org"
    assert address_key("STRASSE@example.org") == address_key("straße@example.org".upper())


def test_address_key_strips_trailing_dot_of_domain() -> None:
    assert address_key("a@example.org.") == "a@example.org"


def test_address_key_keeps_domain_literal() -> None:
    assert address_key("a@[127.0.0.1]") == "a@[127.0.0.1]"


def test_address_key_bad_punycode_is_kept_not_raised() -> None:
    assert address_key("a@xn--zz-invalid-.example") == "a@xn--zz-invalid-.example"


# ----------------------------------------------------------- Message-IDs


def test_r11_message_id_brackets_and_whitespace_removed_case_kept() -> None:
    assert normalise_message_id("  <AbC.123@Example.COM>  ") == "AbC.123@Example.COM"
    assert normalise_message_id("<abc\r\n .def@host>") == "abc.def@host"


def test_r11_microsoft_domain_literal_id() -> None:
    ids, defects = parse_message_ids("<abc@[127.0.0.1]>")
    assert ids == ("abc@[127.0.0.1]",)
    assert defects == ()


def test_r11_double_at_id_kept_with_defect() -> None:
    ids, defects = parse_message_ids("<x@@host>")
    assert ids == ("x@@host",)
    assert MALFORMED_MESSAGE_ID in _kinds(defects)


def test_r11_id_without_brackets_accepted_with_defect() -> None:
    ids, defects = parse_message_ids("abc@host")
    assert ids == ("abc@host",)
    assert MALFORMED_MESSAGE_ID in _kinds(defects)


def test_r11_lone_token_without_at_accepted_with_defect() -> None:
    ids, defects = parse_message_ids("<1234567>")
    assert ids == ("1234567",)
    assert MALFORMED_MESSAGE_ID in _kinds(defects)


def test_r11_free_text_without_ids_yields_nothing() -> None:
    ids, defects = parse_message_ids("your message of Monday")
    assert ids == ()
    assert MALFORMED_MESSAGE_ID in _kinds(defects)


def test_r11_references_duplicates_and_comments_dropped() -> None:
    value = "<a@x> (first)\r\n <b@x> <a@x> Message from Bob <c@x> of today"
    ids, _defects = parse_message_ids(value)
    assert ids == ("a@x", "b@x", "c@x")


def test_r11_empty_brackets_ignored() -> None:
    assert parse_message_ids("<> <a@b>")[0] == ("a@b",)
    assert normalise_message_id("<>") is None
    assert normalise_message_id("") is None


# ----------------------------------------------------------------- dates


def test_date_with_zone_converted_to_utc() -> None:
    assert parse_date("Tue, 1 Jul 2003 10:52:37 +0200") == datetime(
        2003, 7, 1, 8, 52, 37, tzinfo=UTC
    )


def test_date_without_zone_taken_as_utc_with_defect() -> None:
    date_at, defects = parse_date_with_defects("Tue, 1 Jul 2003 10:52:37 -0000")
    assert date_at == datetime(2003, 7, 1, 10, 52, 37, tzinfo=UTC)
    assert NAIVE_DATE in _kinds(defects)


@pytest.mark.parametrize("value", ["", "Malformed Date.", "Mon, 32 Foo 99999 99:99:99 +9999"])
def test_unparseable_date_is_none(value: str) -> None:
    assert parse_date(value) is None


def test_obsolete_two_digit_year_date() -> None:
    parsed = parse_date("21 Jul 96 17:02:55 PDT")
    assert parsed is not None and parsed.year == 1996 and parsed.tzinfo is UTC


# --------------------------------------------------------- encoded-words


def test_encoded_word_split_mid_character_is_joined() -> None:
    # "ö" is C3 B6 in UTF-8; the sender cut it across two encoded-words.
    text, defects = decode_words("=?utf-8?q?J=C3?= =?utf-8?q?=B6rg?=")
    assert text == "Jörg"
    assert defects == ()


def test_base64_encoded_words_split_mid_character() -> None:
    # "€" is E2 82 AC; split after E2 82, each word base64 on its own.
    text, _defects = decode_words("=?UTF-8?B?4oI=?= =?UTF-8?B?rA==?=")
    assert text == "€"


def test_whitespace_between_encoded_words_dropped_but_kept_around_text() -> None:
    assert decode_words("=?utf-8?q?a?= =?utf-8?q?b?= c")[0] == "ab c"


def test_quoted_encoded_word_is_decoded() -> None:
    assert decode_words('"=?utf-8?Q?J=C3=B6rg?=" <j@x.de>')[0] == '"Jörg" <j@x.de>'


def test_adjacent_words_in_different_charsets() -> None:
    text, _ = decode_words("=?iso-8859-1?q?caf=E9?= =?utf-8?q?_=E2=82=AC?=")
    assert text == "café €"


def test_unknown_charset_in_encoded_word_recorded() -> None:
    text, defects = decode_words("=?x-klingon?q?abc?=")
    assert text == "abc"
    assert UNDECODABLE_CHARSET in _kinds(defects)


def test_rfc2231_language_in_encoded_word() -> None:
    assert decode_words("=?utf-8*en?q?hello?=")[0] == "hello"


def test_broken_base64_word_left_as_text_with_defect() -> None:
    text, defects = decode_words("x =?utf-8?b?abcde?= y")
    assert text == "x =?utf-8?b?abcde?= y"
    assert BAD_ENCODED_WORD in _kinds(defects)


def test_raw_8bit_header_utf8_and_latin1() -> None:
    utf8 = "Grüße".encode().decode("ascii", errors="surrogateescape")
    latin = "Grüße".encode("cp1252").decode("ascii", errors="surrogateescape")
    assert fix_8bit_header(utf8) == ("Grüße", ())
    text, defects = fix_8bit_header(latin)
    assert text == "Grüße"
    assert UNDECLARED_8BIT in _kinds(defects)


# ----------------------------------------------------------- body charsets


def test_body_declared_charset_decoded() -> None:
    assert decode_bytes("día".encode("iso-8859-1"), "iso-8859-1", "t") == ("día", ())


def test_body_undeclared_8bit_tries_utf8_first() -> None:
    text, defects = decode_bytes("día €".encode(), None, "t")
    assert text == "día €"
    assert UNDECLARED_8BIT in _kinds(defects)


def test_body_undeclared_cyrillic_detected_by_chardet() -> None:
    text = "Это тестовый текст на русском языке, он достаточно длинный."
    decoded, defects = decode_bytes(text.encode("cp1251"), None, "t")
    assert decoded == text
    assert UNDECLARED_8BIT in _kinds(defects)


def test_body_wrong_declaration_falls_back_with_defect() -> None:
    text, defects = decode_bytes("día €".encode(), "us-ascii", "t")
    assert text == "día €"
    assert UNDECLARED_8BIT in _kinds(defects)
    text, defects = decode_bytes(b"caf\xe9 cr\xe8me br\xfbl\xe9e" * 4, "utf-8", "t")
    assert text.startswith("café crème")
    assert UNDECODABLE_CHARSET in _kinds(defects)


def test_body_unknown_charset_label_falls_back_with_defect() -> None:
    text, defects = decode_bytes("hé".encode(), "x-unknown-klingon", "t")
    assert text == "hé"
    assert UNDECODABLE_CHARSET in _kinds(defects)
