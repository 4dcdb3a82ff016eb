"""Load test: N concurrent simulated phone calls (and a WhatsApp burst) against the gateway.

    # All spawned here: the gateway, a Realtime simulator in its own process (first audio
    # 300 ms) and the Twilio simulator (in this process), so /proc shows the gateway alone.
    .venv/bin/python scripts/loadtest.py --spawn --calls 100 --turns 3 --ramp-s 10
    # Against a gateway already running (its pid gives CPU and RSS):
    .venv/bin/python scripts/loadtest.py --gateway http://127.0.0.1:8080 --gateway-pid 1234
    # The same load in the Realtime voice, then in ElevenLabs' (its simulator spawned too,
    # first audio 75 ms; the model answers in text), the two reports side by side:
    .venv/bin/python scripts/loadtest.py --spawn --voice both
    # The same load on the Realtime API, then on GPT-Live (VOICE_BACKEND=live; its simulator
    # on the same base URL with the same F, speed and VAD), side by side with each's cost:
    .venv/bin/python scripts/loadtest.py --spawn --backend both
    # A burst of 200 signed WhatsApp webhooks (voice notes), reply time at the Twilio simulator:
    .venv/bin/python scripts/loadtest.py --spawn --calls 0 --whatsapp 200

Each caller is `simulators.caller.SimulatedCaller`: the signed voice webhook, the media
stream, a 160-byte mu-law frame every 20 ms for the whole call (silence between utterances),
Twilio's playback buffer and mark echoes. A call waits for the greeting to play out, then says
`--turns` utterances of speech-like audio, each once the previous reply has played out.

Definitions (milliseconds):

* latency: end of caller speech -> first reply frame, at the caller: arrival of the first
  `media` frame after the turn minus the send time of the turn's last speech frame.
* greeting: stream start (the caller sent `start`) -> first `media` frame. The gateway opens
  the Realtime session and asks for the greeting while Twilio fetches the TwiML, so this can be
  less than the upstream's first-audio time F. Target: <= F + 20 ms.
* gateway share, what the gateway adds to the latency:

      share = first reply frame at the caller - send time of the VAD's stop frame - F

  F is the simulator's first-audio latency (`--latency-ms`: response.created -> first audio
  delta). The stop frame is the ceil(S / 20)-th frame after the last speech frame, S being
  the VAD silence window (`--vad-silence-ms`): the simulator's server VAD says
  `speech_stopped` and starts the response when the S ms of silence after the last voiced
  20 ms window have arrived. Each utterance is cut after its last frame that is voiced by the
  simulator's own energy rule, so the stop frame is known exactly. What remains: that frame's
  trip caller -> gateway -> simulator, the simulator's VAD step and timer slack, the first
  delta's trip simulator -> gateway -> caller, and the caller's receive scheduling. It is an
  upper bound on the gateway's own share. The issue's simpler form `latency - S - F` is shown
  as "naive": the same, give or take the caller's own send jitter over those S ms.
* gateway's view (only with --spawn or --db): from the gateway's `turns` table,
  response_latency_ms - upstream_first_audio_ms - S. The gateway dates the end of speech
  by the arrival of the last voiced frame (speech_stopped.audio_end_ms - S), so this is
  (first frame sent - first delta received) + (speech_stopped received - stop frame
  received): its forwarding time plus one gateway <-> simulator round trip, without the
  caller's socket. On GPT-Live (--backend live) the model ends the turn and the gateway
  dates the end of speech itself, so its view is first frame sent - first delta received.
* share with the simulator's own latency: the share with the Realtime simulator's own
  timings (GET /sim/timings) subtracted instead of F. The GPT-Live simulator keeps none:
  "n/a on live".
* cost per call-minute (only with --spawn or --db): the usage rows the measured calls left
  in the gateway's store (all people, per model: tokens, characters, session seconds),
  priced with config/prices.toml ("unknown" for a model it has no price for), over the
  calls' minutes (stream start -> hang-up at the callers).
* frames: protocol violations (anything that is not an exact Twilio shape, per the caller),
  `media` payloads that are not a whole number of 160-byte (20 ms) frames, reply gaps
  (consecutive `media` messages of one reply arriving more than 40 ms apart) and underruns
  (a `media` message arriving after the caller's playback buffer ran dry: an audible gap).
* load generator: how late the callers sent their frames against the 20 ms schedule, and the
  event-loop lag of each generator process. When these grow the generator is saturated and
  its figures, not the gateway, are suspect: split the callers with `--workers`.
* gateway process: CPU seconds (utime + stime of /proc/<pid>/stat) over the load, per call and
  per live call; RSS from /proc/<pid>/status sampled every 250 ms: (peak - before) / peak live
  calls, and VmHWM (the peak over the process's whole life).
"""

# The names the tests and other tools use, from the modules that hold them.
from simulators.caller import FRAME_S

from .callers import ReplyFrames, voiced_clip
from .config import LoadConfig
from .measure import run_load
from .report import format_text
from .stack import Stack
from .summary import Summary
from .workers import start_offset

__all__ = [
    "FRAME_S",
    "LoadConfig",
    "ReplyFrames",
    "Stack",
    "Summary",
    "format_text",
    "run_load",
    "start_offset",
    "voiced_clip",
]
