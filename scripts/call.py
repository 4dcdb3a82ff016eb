"""Place one simulated phone call against a running gateway and print per-turn latencies.

    python scripts/call.py [--turns 3] [--gateway http://127.0.0.1:8080]

Defaults fit `make run` in sandbox mode; with real credentials in the environment
(TWILIO_AUTH_TOKEN, PUBLIC_BASE_URL) it signs like Twilio would for that account.
Latency per turn = last caller speech frame sent -> first reply frame received
(it includes the VAD's silence window).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.runtime import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN
from simulators import caller


def main() -> None:
    port = os.environ.get("PORT", "8080")
    if not os.environ.get("TWILIO_AUTH_TOKEN"):
        os.environ["TWILIO_AUTH_TOKEN"] = SANDBOX_AUTH_TOKEN
        os.environ["TWILIO_ACCOUNT_SID"] = SANDBOX_ACCOUNT_SID
    args = sys.argv[1:]
    if not any(a.startswith("--gateway") for a in args):
        args = ["--gateway", f"http://127.0.0.1:{port}", *args]
    caller.main(args)


if __name__ == "__main__":
    main()
