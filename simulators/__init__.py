"""Wire-faithful simulators of the outside world: OpenAI Realtime, Twilio, callers, WhatsApp."""
