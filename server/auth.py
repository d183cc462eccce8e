"""Tokens (JWT HS256, the shape Supabase issues) and the browser origin check."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import jwt

ALGORITHM = "HS256"
LEEWAY_S = 10


class AuthError(Exception):
    """The token is missing, malformed, badly signed or expired."""


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    expires_at: float


def issue_token(secret: str, user: str, ttl_s: float = 24 * 3600) -> str:
    """A signed token for ``user`` that expires after ``ttl_s`` seconds."""
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + int(ttl_s), "aud": "authenticated"}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str | None) -> Identity:
    """Check signature (HS256 only), ``exp`` and ``sub``; raise AuthError saying which failed."""
    if not token:
        raise AuthError("missing token: send 'Authorization: Bearer <token>' or '?token='")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            leeway=LEEWAY_S,
            # Supabase sets aud='authenticated'; we accept any audience, as Supabase's own API does.
            options={"require": ["sub", "exp"], "verify_aud": False},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as err:
        raise AuthError(f"invalid token: {err}") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise AuthError("invalid token: 'sub' must be a non-empty string")
    return Identity(user=sub, expires_at=float(claims["exp"]))


def bearer(header: str | None) -> str | None:
    """The token from an ``Authorization: Bearer`` header, if any."""
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def origin_allowed(origin: str | None, host: str | None, allowed: frozenset[str]) -> bool:
    """No Origin (wscat, servers) is fine; browsers need our host, localhost or a listed one."""
    if origin is None:
        return True
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.hostname in ("localhost", "127.0.0.1", "::1"):
        return True
    return host is not None and parts.netloc == host
