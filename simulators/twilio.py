"""A local Twilio: Messages and Calls REST APIs, media fetching, signed callbacks, media hosting.

It speaks the real wire formats so the gateway's production code (the `twilio` SDK client,
the signature checks, the media downloader) runs unchanged against it:

* `POST /2010-04-01/Accounts/{AC}/Messages.json` with Basic auth, Twilio-style errors and a
  Twilio-shaped 201 body; then, in the background, the media at each `MediaUrl` is fetched
  like Twilio does (no auth, redirects followed, WhatsApp type rules) and signed status
  callbacks are posted to `StatusCallback`. `GET` on the same path reads them back, newest
  first, filtered on `To` and `From` (one page of `PageSize`).
* Inbound media: `add_media()` returns an `api.twilio.com`-style MediaUrl that needs Basic
  auth and 307-redirects to a second listener (the "CDN", another origin) serving it
  without auth, recording every request so tests can prove credentials never got there.
* `POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json`, Twilio's "modify a live call" (what
  `client.calls(sid).update(...)` sends; `GET` fetches): `Status=completed` hangs up,
  `Twiml` or `Url` redirects, `Status=canceled` leaves an answered call alone; Twilio's
  checks and error bodies (20404 unknown call, 21220 call not in progress, 21205 bad Url,
  32018 Twiml over 4000 characters, 12100 Twiml not a `<Response>` document, 20001 bad
  Status - that code is a guess). Calls are known when added (`add_call()`) or adopted:
  a `SimulatedCaller` whose stream starts is adopted by the simulator given to it, or by
  the one `adopting_callers()` for its account; while its stream is live the call is
  in-progress, and an accepted hangup or redirect ends the stream as Twilio does (`stop`,
  then the close). The simulator neither fetches a `Url` nor runs the new TwiML; it
  records the `<Dial>` target (`CallUpdate.dial_number`).
* Failure injection: `fail_next()`, `lose_next_answers()` (accepted, then the connection
  cut before the answer), `fail_next_call_update()`, `close_window()` (24 h window, 63016),
  media 404-first-N.

`python -m simulators.twilio --port 8766` runs it standalone (the newcomer sandbox).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit
from xml.etree import ElementTree

import aiohttp
from aiohttp import web
from multidict import MultiDictProxy
from twilio.request_validator import RequestValidator

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
USER_AGENT = "TwilioProxy/1.1"

# What WhatsApp accepts as outbound media (Twilio docs); parameters such as codecs= are ignored.
WHATSAPP_MEDIA_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/webp",
        "audio/ogg",
        "audio/amr",
        "audio/3gpp",
        "audio/aac",
        "audio/mp4",
        "audio/mpeg",
        "video/mp4",
        "video/3gpp",
        "application/pdf",
        "application/msword",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "text/vcard",
        "text/x-vcard",
    }
)
MAX_MEDIA_BYTES = 16 * 1024 * 1024
MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_BODY_CHARS = 1600
CALL_SID = re.compile(r"^CA[0-9a-f]{32}$")
MAX_TWIML_CHARS = 4000
UPDATE_STATUSES = ("canceled", "completed")

_ERROR_MESSAGES = {
    12100: "Document parse failure",
    20001: "Invalid Status. Status must be one of: canceled, completed",
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    20503: "Service Unavailable",
    21205: "Url is not a valid URL",
    21211: "Invalid 'To' Phone Number",
    21220: "Call is not in-progress. Cannot redirect.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    21619: "A text message body or media urls must be specified.",
    63016: (
        "Failed to send freeform message because you are outside the allowed window. "
        "If you are using WhatsApp, please use a Message Template."
    ),
    32018: "Twiml size exceeded maximum allowed value of 4000 characters",
    63019: "Media failed to download",
}
_DEFAULT_CODE_FOR_STATUS = {400: 21211, 401: 20003, 404: 20404, 429: 20429, 500: 20500, 503: 20503}


def new_sid(prefix: str) -> str:
    """A Twilio SID: two-letter prefix + 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


def rfc2822_now() -> str:
    return format_datetime(datetime.now(UTC).replace(microsecond=0))


def _rfc2822_at(monotonic: float) -> str:
    wall = time.time() - (time.monotonic() - monotonic)
    return format_datetime(datetime.fromtimestamp(wall, UTC).replace(microsecond=0))


def twilio_error(status: int, code: int, message: str | None = None) -> web.Response:
    """Twilio's legacy JSON error body, which the SDK turns into `TwilioRestException`."""
    body = {
        "code": code,
        "message": message or _ERROR_MESSAGES.get(code, "Error"),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


def _bare_address(address: str) -> str:
    return address.removeprefix("whatsapp:")


def _redacted(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Headers as recorded: keep the fact that credentials were sent, never their value."""
    return {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in headers}


@dataclass
class MediaFetch:
    """Twilio's GET of one outbound MediaUrl, as the phone would receive it."""

    url: str
    status: int | None = None
    content_type: str | None = None
    data: bytes = b""
    length: int = 0
    final_url: str | None = None
    redirects: list[int] = field(default_factory=list)
    request_headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    elapsed_s: float = 0.0


@dataclass
class CallbackDelivery:
    """One status callback POST and how the gateway answered it."""

    status: str
    url: str
    form: dict[str, str]
    signature: str
    http_status: int | None = None
    response_body: str = ""
    error: str | None = None
    at: float = 0.0


@dataclass
class SentMessage:
    """One accepted `Messages.json` create and everything that happened to it afterwards."""

    sid: str
    account_sid: str
    to: str
    from_: str
    body: str
    media_urls: list[str]
    status_callback: str | None
    content_sid: str | None
    form: list[tuple[str, str]]
    date_created: str
    accepted_at: float
    status: str = "queued"
    statuses: list[str] = field(default_factory=lambda: ["queued"])
    error_code: int | None = None
    error_message: str | None = None
    media: list[MediaFetch] = field(default_factory=list)
    callbacks: list[CallbackDelivery] = field(default_factory=list)
    settled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def is_whatsapp(self) -> bool:
        return self.to.startswith("whatsapp:")

    def to_json(self, base_path: str) -> dict[str, Any]:
        uri = f"{base_path}/Messages/{self.sid}"
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": self.body,
            "date_created": self.date_created,
            "date_sent": None,
            "date_updated": self.date_created,
            "direction": "outbound-api",
            "error_code": self.error_code,
            "error_message": self.error_message,
            "from": self.from_,
            "messaging_service_sid": None,
            "num_media": str(len(self.media_urls)),
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": self.sid,
            "status": self.status,
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": self.to,
            "uri": f"{uri}.json",
        }


@dataclass
class RestRequest:
    """Every REST call, including rejected ones (so tests can count retries)."""

    method: str
    path: str
    form: list[tuple[str, str]]
    status: int
    code: int | None
    at: float


@dataclass
class _Failure:
    status: int
    code: int
    message: str | None
    remaining: int


@dataclass
class HostedMedia:
    """Inbound media served at an `api.twilio.com`-style URL, redirecting to the CDN."""

    message_sid: str
    media_sid: str
    data: bytes
    content_type: str
    cdn_token: str
    not_found_remaining: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CdnRequest:
    path: str
    headers: dict[str, str]
    status: int
    at: float


class CallLeg(Protocol):
    """The phone's side of a call (`simulators.caller.SimulatedCaller`), as Twilio sees it."""

    call_sid: str
    from_number: str
    to_number: str
    stream_ended_at: float | None  # monotonic, once the media stream has ended

    @property
    def stream_live(self) -> bool: ...

    async def end_stream(self, reason: str) -> None: ...


@dataclass
class CallUpdate:
    """One accepted POST to a Call resource; `at` is time.monotonic() when accepted."""

    call_sid: str
    status: str | None  # the form's Status
    twiml: str | None  # the Twiml that runs (None when a Url came too: the Url wins)
    url: str | None
    method: str | None
    status_callback: str | None
    form: list[tuple[str, str]]
    at: float
    effect: str = "none"  # "completed" (hung up), "redirected", "none" (Status=canceled)
    dial_number: str | None = None  # the <Dial> target in the Twiml, if any


@dataclass
class SimCall:
    """A call Twilio knows: its status, the TwiML it was redirected to, its updates."""

    sid: str
    account_sid: str
    from_: str
    to: str
    leg: CallLeg | None
    created_at: float  # monotonic
    phone_number_sid: str = field(default_factory=lambda: new_sid("PN"))
    state: str | None = None  # set by updates or add_call(); None: from the leg's stream
    twiml: str | None = None
    url: str | None = None
    dial_number: str | None = None
    ended_at: float | None = None  # monotonic, when an update hung up
    updates: list[CallUpdate] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.state is not None:
            return self.state
        return "in-progress" if self.leg is not None and self.leg.stream_live else "completed"

    def to_json(self, base_path: str) -> dict[str, Any]:
        """The Call resource as the API returns it (what `CallInstance` reads)."""
        uri = f"{base_path}/Calls/{self.sid}"
        ended = self.ended_at or (self.leg.stream_ended_at if self.leg else None)
        done = self.status == "completed"
        end = (ended or time.monotonic()) if done else None
        subresources = ("notifications", "recordings", "payments", "events", "siprec", "streams")
        return {
            "account_sid": self.account_sid,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": _rfc2822_at(self.created_at),
            "date_updated": rfc2822_now(),
            "direction": "inbound",
            "duration": str(round(end - self.created_at)) if end is not None else None,
            "end_time": _rfc2822_at(end) if end is not None else None,
            "forwarded_from": None,
            "from": self.from_,
            "from_formatted": self.from_,
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": self.phone_number_sid,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": self.sid,
            "start_time": _rfc2822_at(self.created_at),
            "status": self.status,
            "subresource_uris": {name: f"{uri}/{name.title()}.json" for name in subresources},
            "to": self.to,
            "to_formatted": self.to,
            "trunk_sid": None,
            "uri": f"{uri}.json",
        }


_ADOPTING: list[TwilioSimulator] = []  # see TwilioSimulator.adopting_callers


def simulator_for(account_sid: str) -> TwilioSimulator | None:
    """The simulator adopting callers of `account_sid`, if one is (the latest wins)."""
    return next((sim for sim in reversed(_ADOPTING) if sim.account_sid == account_sid), None)


class TwilioSimulator:
    """See the module docstring. All records are plain lists for tests to inspect."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        status_callback_delay_s: float = 0.05,
        progression: tuple[str, ...] = ("sent", "delivered"),
        initial_callback: bool = False,
    ) -> None:
        self.account_sid = account_sid
        self._auth_token = auth_token
        self._validator = RequestValidator(auth_token)
        self.status_callback_delay_s = status_callback_delay_s
        # Statuses after "queued", each with a callback. Twilio sends no callback for the
        # initial "queued" status; `initial_callback=True` posts one anyway for robustness tests.
        self.progression = progression
        self.initial_callback = initial_callback
        self.messages: list[SentMessage] = []
        self.rest_requests: list[RestRequest] = []
        self.media: dict[str, HostedMedia] = {}
        self.cdn_requests: list[CdnRequest] = []
        self.calls: dict[str, SimCall] = {}
        self.call_updates: list[CallUpdate] = []
        self.base_url = ""
        self.cdn_base_url = ""
        self.app = self._build_app()
        self._cdn_app = self._build_cdn_app()
        self._failures: list[_Failure] = []
        self._lost_answers = 0
        self._call_failures: list[_Failure] = []
        self._closed_windows: dict[str, str] = {}
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0, cdn_port: int = 0) -> str:
        """Listen on the API origin and on a second origin for the CDN; returns base_url."""
        self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        self.base_url = await self._listen(self.app, host, port)
        self.cdn_base_url = await self._listen(self._cdn_app, host, cdn_port)
        return self.base_url

    async def _listen(self, app: web.Application, host: str, port: int) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runners.append(runner)
        bound_port = runner.addresses[0][1]
        return f"http://{host}:{bound_port}"

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> TwilioSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- test controls ---------------------------------------------------------------------

    def fail_next(
        self, status: int = 500, code: int | None = None, count: int = 1, message: str | None = None
    ) -> None:
        """The next `count` authenticated creates answer `status` with a Twilio error `code`."""
        code = code if code is not None else _DEFAULT_CODE_FOR_STATUS.get(status, 20500)
        self._failures.append(_Failure(status, code, message, count))

    def lose_next_answers(self, count: int = 1) -> None:
        """The next `count` creates are accepted (the message goes out, callbacks follow) but
        their answer never arrives: the connection is cut, as a network drop would."""
        self._lost_answers += count

    def fail_next_call_update(
        self, status: int = 500, code: int | None = None, count: int = 1, message: str | None = None
    ) -> None:
        """The next `count` authenticated Call updates answer `status` with Twilio's `code`."""
        code = code if code is not None else _DEFAULT_CODE_FOR_STATUS.get(status, 20500)
        self._call_failures.append(_Failure(status, code, message, count))

    # ---- calls -----------------------------------------------------------------------------

    def add_call(
        self,
        call_sid: str | None = None,
        *,
        from_: str = "+5516999990001",
        to: str = "+551633334444",
        status: str = "in-progress",
    ) -> SimCall:
        """A call without a media stream (REST-only tests): `status` until an update."""
        sid = call_sid or new_sid("CA")
        call = SimCall(sid, self.account_sid, from_, to, None, time.monotonic(), state=status)
        self.calls[sid] = call
        return call

    def adopt(self, leg: CallLeg) -> SimCall:
        """Know `leg`'s call: in-progress while its stream is live; an accepted hangup or
        redirect ends the stream (`leg.end_stream`)."""
        call = SimCall(
            leg.call_sid, self.account_sid, leg.from_number, leg.to_number, leg, time.monotonic()
        )
        self.calls[call.sid] = call
        return call

    @contextlib.contextmanager
    def adopting_callers(self) -> Iterator[TwilioSimulator]:
        """Within: every `SimulatedCaller` of this account that starts a stream without a
        simulator of its own is adopted here (the tests' `twilio_sim` fixture does this)."""
        _ADOPTING.append(self)
        try:
            yield self
        finally:
            _ADOPTING.remove(self)

    def call(self, sid: str) -> SimCall | None:
        return self.calls.get(sid)

    async def wait_for_call_updates(
        self,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109 - test-facing convenience
    ) -> list[CallUpdate]:
        """The first `n` accepted Call updates."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(self.call_updates) >= n)
        except TimeoutError:
            raise TimeoutError(f"wanted {n} call updates, have {self.call_updates}") from None
        return self.call_updates[:n]

    def close_window(self, to: str, mode: str = "sync") -> None:
        """Recipient's 24 h window is closed: free-form messages fail with 63016.

        mode "sync" answers the create with 400/63016. mode "async" accepts (201) and then
        fails the message with ErrorCode 63016 in the status callback, which is how the
        error is commonly reported for WhatsApp; the gateway should handle both.
        """
        if mode not in ("sync", "async"):
            raise ValueError("mode must be 'sync' or 'async'")
        self._closed_windows[_bare_address(to)] = mode

    def open_window(self, to: str) -> None:
        self._closed_windows.pop(_bare_address(to), None)

    def add_media(
        self,
        data: bytes,
        content_type: str,
        message_sid: str | None = None,
        *,
        not_found_first: int = 0,
    ) -> str:
        """Host inbound media; returns its MediaUrl (needs Basic auth, redirects to the CDN).

        `not_found_first` makes the URL answer 404 that many times first, like Twilio does
        briefly right after a webhook.
        """
        item = HostedMedia(
            message_sid=message_sid or new_sid("MM"),
            media_sid=new_sid("ME"),
            data=data,
            content_type=content_type,
            cdn_token=secrets.token_urlsafe(24),
            not_found_remaining=not_found_first,
        )
        self.media[item.media_sid] = item
        path = f"{self._account_path()}/Messages/{item.message_sid}/Media/{item.media_sid}"
        return self.base_url + path

    async def wait_for_messages(
        self,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109 - test-facing convenience
        *,
        settled: bool = False,
    ) -> list[SentMessage]:
        """The first `n` accepted messages; with `settled`, also wait for their lifecycles."""
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(lambda: len(self.messages) >= n)
                if settled:
                    for message in self.messages[:n]:
                        await message.settled.wait()
        except TimeoutError:
            states = [(m.sid, m.status) for m in self.messages]
            raise TimeoutError(f"wanted {n} messages (settled={settled}), have {states}") from None
        return self.messages[:n]

    def message(self, sid: str) -> SentMessage | None:
        return next((m for m in self.messages if m.sid == sid), None)

    # ---- HTTP apps -------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application()
        accounts = f"/{API_VERSION}/Accounts/{{account}}"
        app.router.add_post(f"{accounts}/Messages.json", self._create_message)
        app.router.add_get(f"{accounts}/Messages.json", self._list_messages)
        app.router.add_get(f"{accounts}/Messages/{{sid}}.json", self._fetch_message)
        app.router.add_get(f"{accounts}/Messages/{{sid}}/Media/{{media}}", self._get_media)
        app.router.add_post(f"{accounts}/Calls/{{sid}}.json", self._update_call)
        app.router.add_get(f"{accounts}/Calls/{{sid}}.json", self._fetch_call)
        # Loopback-only helpers for the sandbox (another process cannot call add_media()).
        app.router.add_post("/_sim/media", self._sim_add_media)
        app.router.add_get("/_sim/messages", self._sim_list_messages)
        return app

    def _build_cdn_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{token}", self._cdn_get)
        return app

    def _account_path(self, account: str | None = None) -> str:
        return f"/{API_VERSION}/Accounts/{account or self.account_sid}"

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        expected = f"{self.account_sid}:{self._auth_token}"
        return hmac.compare_digest(f"{user}:{password}".encode(), expected.encode())

    def _gate(self, request: web.Request) -> web.Response | None:
        """Twilio's order: credentials (401) before the account in the path (404)."""
        if not self._authorized(request):
            return twilio_error(401, 20003)
        if request.match_info["account"] != self.account_sid:
            return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        return None

    # ---- REST: Messages --------------------------------------------------------------------

    async def _create_message(self, request: web.Request) -> web.Response:
        form = await request.post()
        fields = [(k, str(v)) for k, v in form.items()]
        # Twilio's order: credentials, then (injected) server trouble, then the form itself.
        response = self._gate(request)
        if response is None:
            response = self._injected_failure(self._failures)
        if response is None:
            response = self._validate(form)
        if response is None:
            message = self._accept(form, fields)
            response = web.json_response(message.to_json(self._account_path()), status=201)
        self._record_rest(request, fields, response)
        if response.status == 201 and self._lost_answers > 0:
            self._lost_answers -= 1
            assert request.transport is not None
            request.transport.abort()  # the client reads a dropped connection, not an answer
        return response

    async def _list_messages(self, request: web.Request) -> web.Response:
        """Twilio's read: newest first, filtered on To and From, one page of PageSize."""
        if (denied := self._gate(request)) is not None:
            return denied
        query = request.query
        to, from_ = query.get("To"), query.get("From")
        size = min(int(query.get("PageSize", "50")), 1000)
        found = [
            m
            for m in reversed(self.messages)
            if (to is None or m.to == to) and (from_ is None or m.from_ == from_)
        ][:size]
        uri = f"{self._account_path()}/Messages.json"
        fields = [(k, str(v)) for k, v in query.items()]
        response = web.json_response(
            {
                "messages": [m.to_json(self._account_path()) for m in found],
                "end": max(len(found) - 1, 0),
                "first_page_uri": f"{uri}?PageSize={size}&Page=0",
                "next_page_uri": None,
                "page": 0,
                "page_size": size,
                "previous_page_uri": None,
                "start": 0,
                "uri": f"{uri}?PageSize={size}&Page=0",
            }
        )
        self._record_rest(request, fields, response)
        return response

    def _record_rest(
        self, request: web.Request, fields: list[tuple[str, str]], response: web.Response
    ) -> None:
        code = None
        if response.status >= 400 and response.body is not None:
            code = _json_code(response.body)
        self.rest_requests.append(
            RestRequest(
                request.method, request.path, fields, response.status, code, time.monotonic()
            )
        )

    def _injected_failure(self, failures: list[_Failure]) -> web.Response | None:
        if not failures:
            return None
        failure = failures[0]
        failure.remaining -= 1
        if failure.remaining <= 0:
            failures.pop(0)
        return twilio_error(failure.status, failure.code, failure.message)

    def _validate(self, form: MultiDictProxy[Any]) -> web.Response | None:
        to, body = form.get("To", ""), form.get("Body", "")
        has_media, template = bool(form.getall("MediaUrl", [])), bool(form.get("ContentSid"))
        if not to:
            return twilio_error(400, 21604)
        if not form.get("From") and not form.get("MessagingServiceSid"):
            return twilio_error(400, 21603)
        if not body and not has_media and not template:
            return twilio_error(400, 21619)
        if len(body) > MAX_BODY_CHARS:
            return twilio_error(400, 21617)
        if not template and self._closed_windows.get(_bare_address(to)) == "sync":
            return twilio_error(400, 63016)
        return None

    def _accept(self, form: MultiDictProxy[Any], fields: list[tuple[str, str]]) -> SentMessage:
        media_urls = [str(u) for u in form.getall("MediaUrl", [])]
        message = SentMessage(
            sid=new_sid("MM" if media_urls else "SM"),
            account_sid=self.account_sid,
            to=form["To"],
            from_=form.get("From", ""),
            body=form.get("Body", ""),
            media_urls=media_urls,
            status_callback=form.get("StatusCallback") or None,
            content_sid=form.get("ContentSid") or None,
            form=fields,
            date_created=rfc2822_now(),
            accepted_at=time.monotonic(),
        )
        self.messages.append(message)
        self._spawn(self._notify())
        self._spawn(self._lifecycle(message))
        return message

    async def _fetch_message(self, request: web.Request) -> web.Response:
        if (denied := self._gate(request)) is not None:
            return denied
        message = self.message(request.match_info["sid"])
        if message is None:
            return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        return web.json_response(message.to_json(self._account_path()))

    # ---- REST: Calls -----------------------------------------------------------------------

    async def _update_call(self, request: web.Request) -> web.Response:
        form = await request.post()
        fields = [(k, str(v)) for k, v in form.items()]
        response = self._answer_update(request, form, fields)
        self._record_rest(request, fields, response)
        return response

    def _answer_update(
        self, request: web.Request, form: MultiDictProxy[Any], fields: list[tuple[str, str]]
    ) -> web.Response:
        # Credentials, the call, (injected) server trouble, the form, then the call's state.
        call = self._known_call(request)
        if isinstance(call, web.Response):
            return call
        refused = self._injected_failure(self._call_failures)
        if refused is None:
            refused = update_problem(form)
        if refused is not None:
            return refused
        if call.status != "in-progress":
            return twilio_error(400, 21220)
        self._apply_update(call, form, fields)
        return web.json_response(call.to_json(self._account_path()))

    async def _fetch_call(self, request: web.Request) -> web.Response:
        call = self._known_call(request)
        if isinstance(call, web.Response):
            return call
        return web.json_response(call.to_json(self._account_path()))

    def _known_call(self, request: web.Request) -> SimCall | web.Response:
        """The call in the path, or Twilio's 401/404 (a malformed CallSid is not found)."""
        if (denied := self._gate(request)) is not None:
            return denied
        sid = request.match_info["sid"]
        call = self.calls.get(sid) if CALL_SID.match(sid) else None
        if call is None:
            return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        return call

    def _apply_update(
        self, call: SimCall, form: MultiDictProxy[Any], fields: list[tuple[str, str]]
    ) -> CallUpdate:
        status, url = form.get("Status"), form.get("Url") or None
        twiml = None if url else form.get("Twiml")  # with both, Twilio ignores the Twiml
        update = CallUpdate(
            call.sid,
            status,
            twiml,
            url,
            form.get("Method"),
            form.get("StatusCallback"),
            fields,
            time.monotonic(),
        )
        if status == "completed":
            update.effect, call.state, call.ended_at = "completed", "completed", update.at
        elif url or twiml:  # the call stays up, running the new TwiML
            update.effect, call.state = "redirected", "in-progress"
            call.twiml, call.url = twiml, url
            call.dial_number = update.dial_number = dial_number(twiml) if twiml else None
        # Status=canceled only stops calls still queued or ringing: an answered one goes on.
        call.updates.append(update)
        self.call_updates.append(update)
        if update.effect != "none" and call.leg is not None and call.leg.stream_live:
            self._spawn(call.leg.end_stream("completed" if status == "completed" else "redirect"))
        self._spawn(self._notify())
        return update

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- message lifecycle: media fetch, statuses, callbacks -------------------------------

    async def _lifecycle(self, message: SentMessage) -> None:
        try:
            await asyncio.sleep(self.status_callback_delay_s)
            if self.initial_callback:
                await self._post_status(message, "queued")
            error = await self._check_delivery(message)
            if error is not None:
                await self._fail(message, error)
                return
            for status in self.progression:
                await self._set_status(message, status)
                await asyncio.sleep(self.status_callback_delay_s)
        finally:
            message.settled.set()
            await self._notify()

    async def _check_delivery(self, message: SentMessage) -> int | None:
        """Error code that makes this message fail, if any."""
        window = self._closed_windows.get(_bare_address(message.to))
        if window == "async" and message.content_sid is None:
            return 63016
        # WhatsApp delivers one media item per message; Twilio still fetches only the first.
        for url in message.media_urls[:1]:
            fetch = await self._fetch_media(url)
            message.media.append(fetch)
            if media_problem(fetch) is not None:
                return 63019
        return None

    async def _fail(self, message: SentMessage, code: int) -> None:
        message.error_code = code
        message.error_message = _ERROR_MESSAGES.get(code)
        await self._set_status(message, "failed")

    async def _set_status(self, message: SentMessage, status: str) -> None:
        message.status = status
        message.statuses.append(status)
        await self._post_status(message, status)
        await self._notify()

    async def _fetch_media(self, url: str) -> MediaFetch:
        """Plain GET, no credentials, redirects followed: what Twilio does with a MediaUrl."""
        assert self._session is not None
        fetch = MediaFetch(url=url)
        started = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=15)
            async with self._session.get(url, timeout=timeout, allow_redirects=True) as response:
                fetch.status = response.status
                fetch.content_type = response.headers.get("Content-Type")
                fetch.final_url = str(response.url)
                fetch.redirects = [r.status for r in response.history]
                fetch.request_headers = _redacted(response.request_info.headers.items())
                fetch.data = await response.content.read(MAX_MEDIA_BYTES + 1)
                fetch.length = len(fetch.data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            fetch.error = f"{type(exc).__name__}: {exc}"
        fetch.elapsed_s = time.monotonic() - started
        return fetch

    async def _post_status(self, message: SentMessage, status: str) -> None:
        if not message.status_callback:
            return
        form = self.status_form(message, status)
        signature = self._validator.compute_signature(message.status_callback, form)
        delivery = CallbackDelivery(status, message.status_callback, form, signature)
        message.callbacks.append(delivery)
        headers = {
            "X-Twilio-Signature": signature,
            "I-Twilio-Idempotency-Token": secrets.token_hex(16),
        }
        assert self._session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=15)
            async with self._session.post(
                message.status_callback, data=form, headers=headers, timeout=timeout
            ) as response:
                delivery.http_status = response.status
                delivery.response_body = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            delivery.error = f"{type(exc).__name__}: {exc}"
        delivery.at = time.monotonic()

    def status_form(self, message: SentMessage, status: str) -> dict[str, str]:
        """The status callback form, fields as Twilio sends them for WhatsApp."""
        form = {
            "MessageSid": message.sid,
            "SmsSid": message.sid,
            "AccountSid": message.account_sid,
            "From": message.from_,
            "To": message.to,
            "ApiVersion": API_VERSION,
            "MessageStatus": status,
            "SmsStatus": status,
        }
        if message.is_whatsapp:
            form["ChannelPrefix"] = "whatsapp"
            form["ChannelToAddress"] = _bare_address(message.to)
            form["ChannelInstallSid"] = "XE" + "0" * 32
            if status in ("delivered", "read"):
                form["EventType"] = status.upper()
        if status in ("failed", "undelivered") and message.error_code is not None:
            form["ErrorCode"] = str(message.error_code)
            form["ErrorMessage"] = message.error_message or ""
        return form

    # ---- inbound media host and CDN --------------------------------------------------------

    async def _get_media(self, request: web.Request) -> web.StreamResponse:
        item = self.media.get(request.match_info["media"])
        if item is not None:
            item.requests.append({"headers": _redacted(request.headers.items())})
        if (denied := self._gate(request)) is not None:
            return denied
        if item is None or item.message_sid != request.match_info["sid"]:
            return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        if item.not_found_remaining > 0:
            item.not_found_remaining -= 1
            return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        raise web.HTTPTemporaryRedirect(f"{self.cdn_base_url}/{item.cdn_token}")

    async def _cdn_get(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        item = next((m for m in self.media.values() if m.cdn_token == token), None)
        status = 200 if item is not None else 404
        self.cdn_requests.append(
            CdnRequest(request.path, _redacted(request.headers.items()), status, time.monotonic())
        )
        if item is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=item.data, headers={"Content-Type": item.content_type})

    async def _sim_add_media(self, request: web.Request) -> web.Response:
        data = await request.read()
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        url = self.add_media(data, content_type, request.query.get("message_sid"))
        return web.json_response({"media_url": url, "content_type": content_type})

    async def _sim_list_messages(self, request: web.Request) -> web.Response:
        rows = [
            {
                **m.to_json(self._account_path()),
                "statuses": m.statuses,
                "media_fetches": [
                    {
                        "url": f.url,
                        "status": f.status,
                        "content_type": f.content_type,
                        "length": f.length,
                        "error": f.error,
                    }
                    for f in m.media
                ],
                "callbacks": [
                    {"status": c.status, "http_status": c.http_status} for c in m.callbacks
                ],
            }
            for m in self.messages
        ]
        return web.json_response(rows)


def _json_code(body: Any) -> int | None:
    try:
        return int(json.loads(bytes(body))["code"])
    except (ValueError, KeyError, TypeError):
        return None


def media_problem(fetch: MediaFetch) -> str | None:
    """Why WhatsApp would refuse this media (Twilio reports 63019), or None if it is fine."""
    if fetch.error is not None or fetch.status is None:
        return f"download failed: {fetch.error}"
    if not 200 <= fetch.status < 300:
        return f"HTTP {fetch.status}"
    mime = (fetch.content_type or "").split(";")[0].strip().lower()
    if mime not in WHATSAPP_MEDIA_TYPES:
        return f"unsupported content type {mime or '(none)'}"
    limit = MAX_IMAGE_BYTES if mime.startswith("image/") else MAX_MEDIA_BYTES
    if fetch.length == 0 or fetch.length > limit:
        return f"bad size {fetch.length}"
    is_ogg = fetch.data.startswith(b"OggS")
    if is_ogg != (mime == "audio/ogg"):
        return f"content type {mime} does not match the bytes"
    # WhatsApp only takes OGG with the Opus codec; its ID header sits in the first page.
    if is_ogg and b"OpusHead" not in fetch.data[:512]:
        return "OGG without Opus"
    return None


def update_problem(form: MultiDictProxy[Any]) -> web.Response | None:
    """Twilio's 400 for a Call update's form, or None if the form is acceptable."""
    status, url, twiml = form.get("Status"), form.get("Url"), form.get("Twiml")
    if status is not None and status not in UPDATE_STATUSES:
        return twilio_error(400, 20001)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return twilio_error(400, 21205, f"Url is not a valid URL: {url}")
        return None  # the Url wins; the Twiml is not read
    if twiml is not None:
        if len(twiml) > MAX_TWIML_CHARS:
            return twilio_error(400, 32018)
        if _twiml_root(twiml) is None:
            return twilio_error(400, 12100)
    return None


def _twiml_root(twiml: str) -> ElementTree.Element | None:
    """The parsed document if it is well-formed XML with a <Response> root."""
    try:
        root = ElementTree.fromstring(twiml)
    except ElementTree.ParseError:
        return None
    return root if root.tag == "Response" else None


def dial_number(twiml: str) -> str | None:
    """Whom a TwiML document dials: `<Dial>+55…</Dial>` or its `<Number>`, `<Sip>`, `<Client>`."""
    root = _twiml_root(twiml)
    dial = root.find(".//Dial") if root is not None else None
    if dial is None:
        return None
    target = next((c for c in dial if c.tag in ("Number", "Sip", "Client")), dial)
    return (target.text or "").strip() or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Twilio simulator standalone.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--cdn-port", type=int, default=0)
    parser.add_argument(
        "--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID", "AC" + "0" * 32)
    )
    parser.add_argument(
        "--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN", "sandbox-token")
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> None:
    sim = TwilioSimulator(args.account_sid, args.auth_token)
    await sim.start(args.host, args.port, args.cdn_port)
    log.info(
        "Twilio simulator: API %s, CDN %s, account %s",
        sim.base_url,
        sim.cdn_base_url,
        sim.account_sid,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await sim.close()


if __name__ == "__main__":
    main()
