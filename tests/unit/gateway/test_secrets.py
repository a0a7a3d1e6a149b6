"""Token encryption at rest: Fernet keys, HKDF-derived keys, rotation ("Never" list)."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from gateway.config import make_settings
from gateway.secrets import MissingTokenKey, TokenCipher, UndecryptableSecret, fernet_key

SECRET = b"ya29.refresh-token-value"


def test_never_clear_text_and_round_trip() -> None:
    cipher = TokenCipher([Fernet.generate_key().decode()])
    token = cipher.encrypt(SECRET)
    assert SECRET not in token
    assert cipher.decrypt(token) == SECRET


def test_fernet_key_used_as_is_and_passphrase_derived() -> None:
    key = Fernet.generate_key().decode()
    assert fernet_key(key) == key.encode()
    derived = fernet_key("not a fernet key but a long random secret")
    assert derived != b"not a fernet key but a long random secret"
    assert fernet_key("not a fernet key but a long random secret") == derived  # stable
    Fernet(derived)  # valid key


def test_rotation_reads_old_key_and_rotate_moves_to_new() -> None:
    old_cipher = TokenCipher(["old secret value 1234567890"])
    token = old_cipher.encrypt(SECRET)
    both = TokenCipher.from_settings(
        make_settings(
            security={
                "token_key": "new secret 0987654321",
                "previous_token_keys": ["old secret value 1234567890"],
            }
        ).security
    )
    assert both.decrypt(token) == SECRET
    rotated = both.rotate(token)
    assert TokenCipher(["new secret 0987654321"]).decrypt(rotated) == SECRET
    with pytest.raises(UndecryptableSecret):
        TokenCipher(["new secret 0987654321"]).decrypt(token)


def test_tampered_or_missing_key_refused() -> None:
    cipher = TokenCipher(["k" * 40])
    token = bytearray(cipher.encrypt(SECRET))
    token[-5] ^= 1
    with pytest.raises(UndecryptableSecret):
        cipher.decrypt(bytes(token))
    with pytest.raises(MissingTokenKey):
        TokenCipher.from_settings(make_settings().security)


def test_json_round_trip() -> None:
    cipher = TokenCipher(["k" * 40])
    value = {"kind": "oauth", "access_token": "a", "refresh_token": "r"}
    assert cipher.decrypt_json(cipher.encrypt_json(value)) == value
