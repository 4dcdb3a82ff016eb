"""Twilio glue: webhook and WebSocket signature checks, the async REST client, media auth policy.

TwiML helpers live with the call code; this module only knows how to trust Twilio and how
to talk to its REST API (or a local simulator of it).
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import SplitResult, urlparse, urlsplit, urlunsplit

from aiohttp import encode_basic_auth, web
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator, add_port, compare, remove_port
from twilio.rest import Client

log = logging.getLogger(__name__)

TWILIO_API_BASE = "https://api.twilio.com"
SIGNATURE_HEADER = "X-Twilio-Signature"

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def signature_refused(request: web.Request, route: str) -> web.Response:
    """The one answer to a request Twilio did not sign: logged, counted, 403, nothing done."""
    from gateway.observability import REJECTED_SIGNATURES

    log.warning("%s: invalid Twilio signature from %s", route, request.remote)
    REJECTED_SIGNATURES.labels(route).inc()
    return web.Response(status=403, text="invalid signature")


class TwilioSignatures:
    """Checks `X-Twilio-Signature` against the URL Twilio called, i.e. the public one.

    Behind a proxy the gateway sees `http://127.0.0.1:8080/...`, but Twilio signed
    `PUBLIC_BASE_URL + path`, so the public origin is what we validate against.
    Only the origin of `public_base_url` is used: Twilio signs the path it requested,
    which is `request.raw_path` as long as the proxy does not rewrite paths.

    The media stream is reached at `stream_base_url` (this instance's own address when
    several run, PUBLIC_STREAM_BASE_URL), else at the public origin. Twilio signs the stream
    URL our TwiML gave it, so that URL is what a stream's signature is checked against,
    whatever path a proxy routed it by.
    """

    def __init__(self, auth_token: str, public_base_url: str, stream_base_url: str = "") -> None:
        public = urlsplit(public_base_url)
        if public.scheme not in ("http", "https") or not public.netloc:
            raise ValueError("public_base_url must be an absolute http(s) URL")
        self._validator = RequestValidator(auth_token)
        self._origin = f"{public.scheme}://{public.netloc}"
        stream = urlsplit(stream_base_url or self._origin)
        secure = stream.scheme in ("https", "wss")
        self._ws_base = f"{'wss' if secure else 'ws'}://{stream.netloc}{stream.path.rstrip('/')}"

    async def form_ok(self, request: web.Request) -> bool:
        """Validate a form webhook (voice, WhatsApp, status callbacks) over ALL its fields.

        Every field is signed; Twilio adds new ones without notice, so no whitelist.
        """
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return False
        try:
            form = await request.post()
            return self._valid(self._origin + request.raw_path, form, signature)
        except Exception:  # a malformed body or multipart file is simply not a valid signature
            log.debug("signature check failed on an unparsable request", exc_info=True)
            return False

    def ws_ok(self, request: web.Request) -> bool:
        """Validate a Media Streams WebSocket upgrade. Call before `ws.prepare()`.

        Twilio signs the `wss://` URL (not `https://`) with no parameters.
        """
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return False
        try:
            return self._valid(self.stream_url(_last_segment(request.path)), {}, signature)
        except Exception:
            return False

    def _valid(self, url: str, params: Any, signature: str) -> bool:
        """`RequestValidator.validate` for form bodies, stopping at the first match.

        The SDK always computes both URL variants (with and without the default port); the
        one Twilio signs is nearly always the first, so this halves the HMAC work of a
        webhook burst. Same SDK functions, same answers.
        """
        parsed = urlparse(url)
        for candidate in (remove_port(parsed), add_port(parsed)):
            if compare(self._validator.compute_signature(candidate, params), signature):
                return True
        return False

    def stream_url(self, path: str = "/media-stream") -> str:
        """The `<Stream url>` for TwiML: wss for an https public URL, ws for http."""
        return self._ws_base + path


def _last_segment(path: str) -> str:
    """The route's own path (`/media-stream`), whatever prefix a proxy left in front."""
    return "/" + path.rstrip("/").rsplit("/", 1)[-1]


class LocalTwilioHttpClient(AsyncTwilioHttpClient):
    """The SDK's async client, plus a base-URL override and a timeout that is actually applied.

    The SDK hard-codes `https://api.twilio.com` and passes `timeout=None` to aiohttp,
    so without this a stuck Twilio request would hang a worker forever.
    Must be constructed inside a running event loop (the SDK creates its session eagerly).
    """

    def __init__(self, target: str | None = None, *, timeout: float = 10.0, **kwargs) -> None:
        super().__init__(timeout=timeout, **kwargs)
        self._target: SplitResult | None = urlsplit(target.rstrip("/")) if target else None

    def rewrite(self, url: str) -> str:
        """Point `*.twilio.com` (including edge/region hosts) at the target, if any."""
        if self._target is None:
            return url
        parts = urlsplit(url)
        host = parts.hostname or ""
        if host != "twilio.com" and not host.endswith(".twilio.com"):
            return url
        t = self._target
        return urlunsplit((t.scheme, t.netloc, t.path + parts.path, parts.query, ""))

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the SDK's signature
        allow_redirects: bool = False,
    ) -> Response:
        headers = dict(headers or {})
        if auth is not None:
            # Same bytes as the SDK's BasicAuth, without aiohttp 3.14's deprecated `auth=`.
            headers["Authorization"] = encode_basic_auth(*auth)
        return await super().request(
            method,
            self.rewrite(url),
            params=params,
            data=data,
            headers=headers,
            auth=None,
            timeout=timeout or self.timeout,
            allow_redirects=allow_redirects,
        )


def make_rest_client(
    account_sid: str, auth_token: str, api_base_url: str = TWILIO_API_BASE, timeout: float = 10.0
) -> Client:
    """An async-capable `twilio.rest.Client`. Call inside a running loop; close it on shutdown."""
    target = None if _same_origin(api_base_url, TWILIO_API_BASE) else api_base_url
    http_client = LocalTwilioHttpClient(target, timeout=timeout)
    return Client(account_sid, auth_token, http_client=http_client)


async def close_rest_client(client: Client) -> None:
    close = getattr(client.http_client, "close", None)
    if close is not None:
        await close()


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the default port filled in; None if unparsable or has userinfo."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    return scheme, parts.hostname, port or _DEFAULT_PORTS[scheme]


def _same_origin(a: str, b: str) -> bool:
    origin_a = _origin(a)
    return origin_a is not None and origin_a == _origin(b)


_SID_HEX = "[0-9a-fA-F]{32}"
_MEDIA_PATH = re.compile(
    rf"/2010-04-01/Accounts/(AC{_SID_HEX})/Messages/(?:MM|SM){_SID_HEX}/Media/ME{_SID_HEX}"
)


def media_auth_allowed(url: str, api_base_url: str, account_sid: str) -> bool:
    """May our Basic credentials be sent to this MediaUrl?

    Only to Twilio's API host and only for our account's message media resources:
    a forged MediaUrl in a webhook must never make us leak `AccountSid:AuthToken`.
    """
    origin = _origin(url)
    if origin is None or origin not in (_origin(api_base_url), _origin(TWILIO_API_BASE)):
        return False
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        return False
    match = _MEDIA_PATH.fullmatch(parts.path)
    return match is not None and match.group(1) == account_sid
