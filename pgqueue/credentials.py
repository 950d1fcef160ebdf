"""Tenants' Twilio auth tokens at rest: Fernet envelope encryption with keys from the
environment (PGQUEUE_SECRET_KEYS), never from the database.

A stored token is `fernet:<Fernet token>` (AES-128-CBC + HMAC-SHA256, with the time it
was made); one written before encryption, or without a key, is the token itself and keeps
working until `pgqueue tenant rotate-key` encrypts it. The first key encrypts and every
key decrypts (MultiFernet), so a key is rotated by putting a new one first, running
rotate-key, then dropping the old one.

Decrypted only where the token is used: the worker's send (providers/twilio.py), the
API's direct send and the signature check of a status callback (it is the HMAC key), and
rotate-key. Listings read the tenants' public columns only (queries.sql admin_tenants).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from pgqueue.errors import ConfigError, TenantSendError

PREFIX = "fernet:"
# What completion.decide records when a worker cannot decrypt a tenant's token: the
# tenant is paused (its jobs wait, no attempt spent) until an operator fixes the keys.
UNDECRYPTABLE = "auth_token_undecryptable"


class CredentialError(ConfigError):
    code = "credentials_unreadable"


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


class Keyring:
    """The keys of PGQUEUE_SECRET_KEYS. Without any, `seal` stores plain text (and says
    so through `encrypts`), and `open` refuses what was sealed."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(keys)
        self._fernet: Any = None
        if self._keys:
            self._fernet = MultiFernet([Fernet(k.encode("ascii")) for k in self._keys])

    @property
    def encrypts(self) -> bool:
        return self._fernet is not None

    def seal(self, token: str) -> str:
        """The value to store for `token`: encrypted with the first key, or as is when
        there is no key."""
        if self._fernet is None:
            return token
        return PREFIX + str(self._fernet.encrypt(token.encode("utf-8")).decode("ascii"))

    def open(self, stored: str) -> str:
        """The token of a stored value; plain values are returned as they are. Raises
        CredentialError when no key here decrypts it."""
        if not is_sealed(stored):
            return stored
        if self._fernet is None:
            raise _unreadable(self)

        try:
            plain = self._fernet.decrypt(stored[len(PREFIX) :].encode("ascii"))
            return str(plain.decode("utf-8"))
        except (InvalidToken, UnicodeError):
            raise _unreadable(self) from None

    def reseal(self, stored: str) -> str:
        """`stored` encrypted with the first key (what rotate-key writes)."""
        if self._fernet is None:
            raise CredentialError(
                "PGQUEUE_SECRET_KEYS is not set: there is no key to encrypt the tokens with"
            )
        if not is_sealed(stored):
            return self.seal(stored)

        try:
            fresh = self._fernet.rotate(stored[len(PREFIX) :].encode("ascii"))
        except (InvalidToken, UnicodeError):
            raise _unreadable(self) from None
        return PREFIX + str(fresh.decode("ascii"))


def _unreadable(keyring: Keyring) -> CredentialError:
    if not keyring.encrypts:
        return CredentialError(
            "a tenant's auth token is encrypted and PGQUEUE_SECRET_KEYS is not set here"
        )
    return CredentialError(
        "a tenant's auth token is encrypted with a key that is not in PGQUEUE_SECRET_KEYS"
    )


def open_for_send(keyring: Keyring, stored: str) -> str:
    """`open` for a send: a token this process cannot decrypt is the tenant's set-up
    failing (TenantSendError), so the tenant is paused instead of its messages burning
    retries into dead letters."""
    try:
        return keyring.open(stored)
    except CredentialError as exc:
        raise TenantSendError(exc.message, provider_code=UNDECRYPTABLE) from None
