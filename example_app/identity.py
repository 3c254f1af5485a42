"""The demo identity provider: an RSA key made at start, its JWKS, and tokens for a user name.

In a real deployment this is your identity provider (Keycloak, Auth0, ...): the bus only
needs its JWKS URL, and your back end hands the browser a token whose `channels` claim
lists what the user may subscribe to.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

__all__ = [
    "AUDIENCE",
    "PRESENCE",
    "STAFF_ROLE",
    "IdentityProvider",
    "IssuedToken",
    "check_user_name",
]

AUDIENCE: Final = "wsbus"
LOBBY: Final = "chat:lobby"
STAFF_ROOM: Final = "chat:staff"
STAFF_ROLE: Final = "staff"  # in the `roles` claim of staff tokens: what staff-only routes check
# The rooms whose "online" list the bus keeps (its `presence` setting) and every token
# may read (the `presence` claim); a page only ever gets the lists of rooms it joined.
PRESENCE: Final = ("chat:*", "room:*")

# User names become channel names (user:NAME), so they are kept to a safe alphabet.
_USER_NAME_RE: Final = re.compile(r"[a-z0-9_-]{1,32}")


def check_user_name(name: object) -> str:
    """Return `name` if it is a valid user name; raise ValueError saying why not."""
    if not isinstance(name, str) or _USER_NAME_RE.fullmatch(name) is None:
        raise ValueError("user names are 1 to 32 characters from a-z, 0-9, _ and -")
    return name


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed token and what it says, for the login response."""

    token: str
    user: str
    expires_at: int
    channels: list[str]
    is_staff: bool


class IdentityProvider:
    """Signs RS256 tokens for any valid user name; staff also get the staff room and role."""

    def __init__(
        self, issuer: str, *, staff: Collection[str] = (), token_lifetime: int = 120
    ) -> None:
        for name in staff:
            check_user_name(name)
        if token_lifetime < 1:
            raise ValueError("token_lifetime must be at least 1 second")
        self.issuer = issuer
        self.staff = frozenset(staff)
        self.token_lifetime = token_lifetime
        self.key_id = secrets.token_hex(8)
        self._private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        """The public key set, as served at /.well-known/jwks.json."""
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self._private_key.public_key(), as_dict=True)
        jwk.update(kid=self.key_id, alg="RS256", use="sig")
        return {"keys": [jwk]}

    def channels_for(self, user: str) -> list[str]:
        """The channels `user` may subscribe to: the grants the bus enforces."""
        channels = [LOBBY, f"user:{user}"]
        if user in self.staff:
            channels.append(STAFF_ROOM)
        return channels

    def publish_for(self, user: str) -> list[str]:
        """The channels `user` may publish to: their rooms, and anyone's direct channel."""
        return [c for c in self.channels_for(user) if not c.startswith("user:")] + ["user:*"]

    def issue(self, user: str) -> IssuedToken:
        """A fresh token for `user` (raises ValueError for a bad name)."""
        check_user_name(user)
        # `iat` keeps the fraction of a second (JWT allows it): "sign out everywhere"
        # revokes this user's tokens issued before now, and a token issued a moment
        # later, in the same second, must not count as one of them.
        now = time.time()
        expires_at = int(now) + self.token_lifetime
        channels = self.channels_for(user)
        is_staff = user in self.staff
        claims = {
            "sub": user,
            "iss": self.issuer,
            "aud": AUDIENCE,
            "iat": now,
            "exp": expires_at,
            "channels": channels,
            # Pages publish on their socket (and could emit with the token): the
            # app's on_publish hooks stamp the verified sender on every such message.
            "publish": self.publish_for(user),
            "roles": [STAFF_ROLE] if is_staff else [],
            "presence": list(PRESENCE),
            "info": {"name": user},  # what the others' "online" lists show
        }
        token = jwt.encode(
            claims, self._private_key, algorithm="RS256", headers={"kid": self.key_id}
        )
        return IssuedToken(token, user, expires_at, channels, is_staff)
