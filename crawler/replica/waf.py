"""The replica's WAF: a cookie that only a client executing the page's JavaScript obtains.

Each HTML page carries a script holding a server-signed stamp, cut into reversed, shuffled pieces.
The script reassembles the stamp, computes a proof (an iterated FNV-1a hash of it) and sets
``ohs_waf=<stamp>.<proof>``. No ``Set-Cookie`` is ever sent. The server checks the signature, the
proof and the age (``ttl``), so a plain HTTP client without a JS engine never gets through.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import time

COOKIE_NAME = "ohs_waf"
PROOF_ROUNDS = 400


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rem = divmod(number, 36)
        out = digits[rem] + out
        if not number:
            return out


def proof_of(stamp: str) -> str:
    """Iterated 32-bit FNV-1a over the stamp; the page's script computes the same in JS."""
    h = 2166136261
    codes = [ord(ch) for ch in stamp]
    for round_no in range(PROOF_ROUNDS):
        for code in codes:
            h = ((h ^ code) * 16777619) & 0xFFFFFFFF
        h ^= round_no
    return _base36(h)


class Waf:
    def __init__(self, ttl: float = 3600.0, secret: bytes | None = None, clock=time.time):
        self.ttl = ttl
        self.secret = secret or os.urandom(32)
        self.clock = clock
        self._verified: dict[str, int] = {}  # token -> issue time; proofs are checked once
        # Off (``--no-waf``): pages carry no script and every call passes, as on a day the
        # shop's WAF is switched off.
        self.enabled = True
        # How a refused call is answered: 403 "Access Denied", or (``--waf-challenge-page``)
        # the JS challenge page with status 200, as WAFs that challenge instead of blocking do.
        self.challenge_page = False

    def _signature(self, issued_b36: str) -> str:
        return hmac.new(self.secret, issued_b36.encode(), hashlib.sha256).hexdigest()[:20]

    def stamp(self, issued_at: float | None = None) -> str:
        issued = _base36(int(self.clock() if issued_at is None else issued_at))
        return f"{issued}.{self._signature(issued)}"

    def mint(self, issued_at: float | None = None) -> str:
        """The token a browser would compute from a page rendered at ``issued_at``."""
        stamp = self.stamp(issued_at)
        return f"{stamp}.{proof_of(stamp)}"

    def check(self, token: str | None) -> str | None:
        """None when the token lets the request through, else why not: missing/invalid/expired."""
        if not self.enabled:
            return None
        if not token:
            return "missing"
        issued = self._verified.get(token)
        if issued is None:
            parts = token.split(".")
            if len(parts) != 3:
                return "invalid"
            issued_b36, signature, proof = parts
            if not hmac.compare_digest(signature, self._signature(issued_b36)):
                return "invalid"
            if proof != proof_of(f"{issued_b36}.{signature}"):
                return "invalid"
            issued = int(issued_b36, 36)
            if len(self._verified) > 100_000:
                self._verified.clear()
            self._verified[token] = issued
        if self.clock() - issued > self.ttl:
            return "expired"
        return None

    def script(self) -> str:
        """The inline ``<script>`` that sets the cookie (fresh stamp on every page view)."""
        if not self.enabled:
            return ""
        stamp = self.stamp()
        rng = random.Random()
        pieces, i = [], 0
        while i < len(stamp):
            size = rng.randint(2, 5)
            pieces.append(stamp[i:i + size][::-1])
            i += size
        order = list(range(len(pieces)))
        rng.shuffle(order)
        shuffled = [pieces[k] for k in order]
        position = [order.index(k) for k in range(len(pieces))]  # where piece k sits now
        return (
            "<script>(function(){"
            f"var _p={json.dumps(shuffled)},_o={json.dumps(position)},s='';"
            "for(var i=0;i<_o.length;i++){s+=_p[_o[i]].split('').reverse().join('');}"
            "var h=2166136261;"
            f"for(var r=0;r<{PROOF_ROUNDS};r++){{for(var j=0;j<s.length;j++){{"
            "h=Math.imul((h^s.charCodeAt(j))>>>0,16777619)>>>0;}h=(h^r)>>>0;}"
            f"document.cookie='{COOKIE_NAME}='+s+'.'+h.toString(36)+'; path=/; max-age="
            f"{int(self.ttl)}; SameSite=Lax';"
            "})();</script>"
        )
