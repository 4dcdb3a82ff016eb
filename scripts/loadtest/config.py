"""The load's settings, and the command line that fills them in."""

from __future__ import annotations

import argparse
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from gateway.runtime import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN
from simulators.caller import FRAME_S

from . import __doc__ as DESCRIPTION  # the package's docstring is the --help text


@dataclass
class LoadConfig:
    gateway_url: str = "http://127.0.0.1:8080"
    public_base_url: str = ""  # what Twilio signs over; default: gateway_url
    auth_token: str = SANDBOX_AUTH_TOKEN
    account_sid: str = SANDBOX_ACCOUNT_SID
    calls: int = 10
    turns: int = 3
    ramp_s: float = 5.0  # call i starts at about i * ramp_s / calls (see start_offset)
    phases: str = "spread"  # spread: callers' frame clocks at unrelated phases | grid
    speech_ms: int = 1500  # length of each utterance before trimming to its last voiced frame
    first_audio_ms: float = 300.0  # the simulator's response.created -> first delta
    vad_silence_ms: int = 500  # the gateway's VAD_SILENCE_MS
    vad_threshold: float = 0.5  # the gateway's VAD_THRESHOLD
    reply_timeout_s: float = 10.0
    quiet_s: float = 0.3  # playback idle: buffer empty and no audio for this long
    max_s: float = 90.0  # hard bound on the call phase, ramp included
    workers: int = 1  # generator processes (callers split round-robin)
    warmup: int = 1  # calls before the measured load (cold imports, first connections)
    whatsapp: int = 0  # burst size; 0: no burst
    whatsapp_kind: str = "voice"  # voice (needs a Twilio simulator for the media) | text
    whatsapp_timeout_s: float = 60.0
    voice: str = "openai"  # who speaks the replies: the gateway's VOICE_PROVIDER
    backend: str = "realtime"  # which OpenAI API answers: the gateway's VOICE_BACKEND

    def __post_init__(self) -> None:
        self.public_base_url = (self.public_base_url or self.gateway_url).rstrip("/")

    @property
    def silence_frames(self) -> int:
        return math.ceil(self.vad_silence_ms / (FRAME_S * 1000))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--gateway", default="http://127.0.0.1:8080", help="gateway base URL")
    p.add_argument("--public-base-url", default=env.get("PUBLIC_BASE_URL", ""))
    p.add_argument("--auth-token", default=env.get("TWILIO_AUTH_TOKEN", SANDBOX_AUTH_TOKEN))
    p.add_argument("--account-sid", default=env.get("TWILIO_ACCOUNT_SID", SANDBOX_ACCOUNT_SID))
    p.add_argument("--gateway-pid", type=int, help="for CPU and RSS of a running gateway")
    p.add_argument("--simulator-pid", type=int, help="a running Realtime simulator's pid")
    p.add_argument("--simulator-url", help="a running Realtime simulator's origin (its timings)")
    p.add_argument("--db", type=Path, help="the running gateway's SQLite file (its own view)")
    p.add_argument("--twilio-sim", help="a running Twilio simulator's URL (WhatsApp replies)")
    p.add_argument("--spawn", action="store_true", help="start gateway + simulators here")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--ramp-s", type=float, default=5.0)
    p.add_argument(
        "--phases",
        choices=("spread", "grid"),
        default="spread",
        help="callers' 20 ms frame phases: spread like real calls, or all on one grid (stress)",
    )
    p.add_argument("--speech-ms", type=int, default=1500)
    p.add_argument("--latency-ms", type=float, default=300.0, help="simulator first audio")
    p.add_argument("--vad-silence-ms", type=int, default=500)
    p.add_argument("--vad-threshold", type=float, default=0.5)
    p.add_argument("--reply-timeout-s", type=float, default=10.0)
    p.add_argument("--max-s", type=float, default=90.0, help="bound on the call phase")
    p.add_argument("--workers", type=int, default=1, help="load generator processes")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured calls first")
    p.add_argument("--whatsapp", type=int, default=0, help="WhatsApp burst size")
    p.add_argument("--whatsapp-kind", choices=("voice", "text"), default="voice")
    p.add_argument("--whatsapp-timeout-s", type=float, default=60.0)
    p.add_argument(
        "--voice",
        choices=("openai", "elevenlabs", "both"),
        default="openai",
        help="the Realtime voice, or ElevenLabs' (its simulator spawned too, first audio "
        "75 ms); both: the same load in each, one after the other, side by side",
    )
    p.add_argument(
        "--backend",
        choices=("realtime", "live", "both"),
        default="realtime",
        help="the OpenAI API the gateway answers with (VOICE_BACKEND): Realtime or GPT-Live "
        "(its simulator on the same base URL, same F and speed); both: the same load on "
        "each, one after the other, side by side",
    )
    p.add_argument("--sim-arg", action="append", default=[], help="extra simulator flag")
    p.add_argument("--gateway-log-level", default="INFO")
    p.add_argument("--keep", action="store_true", help="keep the spawned processes' logs")
    p.add_argument("--pin", action="store_true", help="gateway on CPU 0, the rest on CPU 1")
    p.add_argument("--profile", help="py-spy output (.svg, .json or raw) for the call phase")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.ramp_s >= args.max_s:
        p.error("--ramp-s must be shorter than --max-s (which bounds the whole call phase)")
    if args.calls < 0 or args.whatsapp < 0 or args.turns < 0:
        p.error("--calls, --turns and --whatsapp cannot be negative")
    if args.voice != "openai" and not args.spawn:
        p.error("--voice elevenlabs or both needs --spawn (a running gateway has its own voice)")
    if args.backend != "realtime" and not args.spawn:
        p.error("--backend live or both needs --spawn (a running gateway has its own backend)")
    if args.voice == "both" and args.backend == "both":
        p.error("--voice both and --backend both: compare one thing at a time")
    if args.voice != "openai" and args.backend != "realtime":
        p.error(
            f"--voice {args.voice} with --backend {args.backend}: ElevenLabs' voice needs "
            "--backend realtime; GPT-Live speaks in its own voice (the gateway refuses "
            "VOICE_PROVIDER=elevenlabs with VOICE_BACKEND=live)"
        )
    if args.spawn and args.gateway == "http://127.0.0.1:8080":
        args.gateway = f"http://127.0.0.1:{free_port()}"
    return args


def config_from(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        gateway_url=args.gateway,
        public_base_url=args.public_base_url,
        auth_token=args.auth_token,
        account_sid=args.account_sid,
        calls=args.calls,
        turns=args.turns,
        ramp_s=args.ramp_s,
        phases=args.phases,
        speech_ms=args.speech_ms,
        first_audio_ms=args.latency_ms,
        vad_silence_ms=args.vad_silence_ms,
        vad_threshold=args.vad_threshold,
        reply_timeout_s=args.reply_timeout_s,
        max_s=args.max_s,
        workers=max(1, args.workers),
        warmup=args.warmup,
        whatsapp=args.whatsapp,
        whatsapp_kind=args.whatsapp_kind,
        whatsapp_timeout_s=args.whatsapp_timeout_s,
        voice=args.voice,
        backend=args.backend,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
