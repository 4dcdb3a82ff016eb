import subprocess
import sys

import pytest

from gateway.settings import Settings, SettingsError


def test_defaults_are_the_contract():
    s = Settings.from_env({})
    assert s.realtime_model == "gpt-realtime-2.1"
    assert s.port == 8080
    assert s.twilio_api_base_url == "https://api.twilio.com"
    assert s.database_url.startswith("sqlite:///data/")
    assert s.sandbox_realtime and s.sandbox_twilio
    assert s.public_base_url == "http://127.0.0.1:8080"


def test_realtime_voice_is_a_built_in_name_a_custom_id_or_the_personas():
    assert Settings.from_env({}).realtime_voice is None  # the persona decides
    assert Settings.from_env({"REALTIME_VOICE": "ash"}).realtime_voice == "ash"
    custom = Settings.from_env({"REALTIME_VOICE": "voice_1234"})
    assert custom.realtime_voice == "voice_1234"


def test_realtime_ws_url_is_derived_from_the_sdk_base_url():
    assert Settings.from_env({}).realtime_ws_url == "wss://api.openai.com/v1/realtime"
    local = Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:9000/v1/"})
    assert local.realtime_ws_url == "ws://127.0.0.1:9000/v1/realtime"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"OPENAI_BASE_URL": "ftp://x"}, "OPENAI_BASE_URL"),
        ({"PUBLIC_BASE_URL": "https://gw.example.com/path"}, "PUBLIC_BASE_URL"),
        ({"PUBLIC_BASE_URL": "gw.example.com"}, "PUBLIC_BASE_URL"),
        ({"TWILIO_API_BASE_URL": "nope"}, "TWILIO_API_BASE_URL"),
        ({"TWILIO_ACCOUNT_SID": "AC" + "0" * 32}, "TWILIO_AUTH_TOKEN"),
        ({"TWILIO_AUTH_TOKEN": "t"}, "TWILIO_ACCOUNT_SID"),
        ({"TWILIO_ACCOUNT_SID": "XX1", "TWILIO_AUTH_TOKEN": "t"}, "TWILIO_ACCOUNT_SID"),
        ({"DATABASE_URL": "postgresql://db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///:memory:"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///file:x?mode=memory&cache=shared"}, "DATABASE_URL"),
        ({"REALTIME_STALL_S": "0"}, "REALTIME_STALL_S"),
        ({"CALL_SESSION_ROTATE_S": "9999"}, "CALL_SESSION_ROTATE_S"),
        ({"REALTIME_VOICE": "nova"}, "REALTIME_VOICE"),
        ({"REALTIME_VOICE": "voice_"}, "REALTIME_VOICE"),
        ({"VAD_THRESHOLD": "2"}, "VAD_THRESHOLD"),
        ({"VAD_TYPE": "push_to_talk"}, "VAD_TYPE"),
    ],
)
def test_a_bad_value_names_its_variable(env, variable):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert err.value.variable == variable
    assert str(err.value).startswith(variable)


def test_the_session_age_has_one_setting_and_its_old_name_still_works():
    assert Settings.from_env({}).realtime_session_max_s == 3300
    assert Settings.from_env({"CALL_SESSION_ROTATE_S": "120"}).realtime_session_max_s == 120
    both = {"CALL_SESSION_ROTATE_S": "120", "REALTIME_SESSION_MAX_S": "60"}
    assert Settings.from_env(both).realtime_session_max_s == 60


def test_secrets_never_appear_in_repr():
    s = Settings.from_env(
        {
            "OPENAI_API_KEY": "sk-very-secret",
            "TWILIO_ACCOUNT_SID": "AC" + "1" * 32,
            "TWILIO_AUTH_TOKEN": "tok-very-secret",
            "ADMIN_TOKEN": "adm-very-secret",
        }
    )
    text = repr(s)
    assert "very-secret" not in text
    assert not s.sandbox_realtime and not s.sandbox_twilio


def test_the_command_line_reports_a_bad_variable_and_exits(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gateway"],
        env={"PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "PORT" in proc.stderr and "not-a-port" in proc.stderr


def test_tool_settings_are_optional_and_checked_naming_the_variable():
    s = Settings.from_env({})
    assert s.crm_webhook_url is None and s.human_transfer_number is None
    s = Settings.from_env(
        {
            "CRM_WEBHOOK_URL": "https://crm.example.com/hook",
            "CRM_WEBHOOK_SECRET": "s3cr3t",
            "HUMAN_TRANSFER_NUMBER": "+5516999990000",
            "HUMAN_WHATSAPP_NUMBER": "+5516999990001",
        }
    )
    assert s.crm_webhook_url == "https://crm.example.com/hook"
    assert "s3cr3t" not in repr(s)
    for env, name in (
        ({"CRM_WEBHOOK_URL": "https://crm.example.com/hook"}, "CRM_WEBHOOK_SECRET"),
        ({"CRM_WEBHOOK_URL": "ftp://crm", "CRM_WEBHOOK_SECRET": "x"}, "CRM_WEBHOOK_URL"),
        ({"HUMAN_TRANSFER_NUMBER": "016 99999"}, "HUMAN_TRANSFER_NUMBER"),
        ({"HUMAN_WHATSAPP_NUMBER": "whatsapp:+5516999990000"}, "HUMAN_WHATSAPP_NUMBER"),
    ):
        with pytest.raises(SettingsError) as err:
            Settings.from_env(env)
        assert err.value.args[0] == name or name in str(err.value)


def test_the_voice_is_openai_unless_elevenlabs_is_chosen_and_complete():
    s = Settings.from_env({})
    assert s.voice_provider == "openai" and s.elevenlabs_api_key is None
    assert s.elevenlabs_model == "eleven_flash_v2_5"  # low latency, multilingual (pt-BR)
    assert s.elevenlabs_base_url == "https://api.elevenlabs.io"
    live = {"OPENAI_API_KEY": "sk-x"}
    chosen = Settings.from_env(
        {
            **live,
            "VOICE_PROVIDER": "elevenlabs",
            "ELEVENLABS_API_KEY": "xi-very-secret",
            "ELEVENLABS_VOICE_ID": "EndrigoVoice123",
            "ELEVENLABS_MODEL": "eleven_turbo_v2_5",
            "ELEVENLABS_BASE_URL": "http://127.0.0.1:9100/",
        }
    )
    assert chosen.voice_provider == "elevenlabs" and not chosen.sandbox_elevenlabs
    assert (chosen.elevenlabs_voice_id, chosen.elevenlabs_model) == (
        "EndrigoVoice123",
        "eleven_turbo_v2_5",
    )
    assert chosen.elevenlabs_base_url == "http://127.0.0.1:9100"
    assert "very-secret" not in repr(chosen)
    # The sandbox (no OpenAI key) simulates ElevenLabs too, with its own voice id.
    sandbox = Settings.from_env({"VOICE_PROVIDER": "elevenlabs"})
    assert sandbox.sandbox_elevenlabs and sandbox.elevenlabs_voice_id


def test_the_backend_is_realtime_unless_gpt_live_is_chosen():
    s = Settings.from_env({})
    assert (s.voice_backend, s.live_model) == ("realtime", "gpt-live-1.1")
    live = Settings.from_env({"VOICE_BACKEND": "live", "LIVE_MODEL": "gpt-live-1"})
    assert (live.voice_backend, live.live_model) == ("live", "gpt-live-1")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"VOICE_PROVIDER": "azure"}, "VOICE_PROVIDER"),
        # A real OpenAI with a simulated ElevenLabs is a mistake, not a sandbox.
        ({"OPENAI_API_KEY": "sk-x", "VOICE_PROVIDER": "elevenlabs"}, "ELEVENLABS_API_KEY"),
        (
            {"OPENAI_API_KEY": "sk-x", "VOICE_PROVIDER": "elevenlabs", "ELEVENLABS_API_KEY": "k"},
            "ELEVENLABS_VOICE_ID",
        ),
        # ElevenLabs configured but not chosen: the owner meant to choose it.
        ({"ELEVENLABS_VOICE_ID": "EndrigoVoice123"}, "VOICE_PROVIDER"),
        ({"VOICE_PROVIDER": "elevenlabs", "ELEVENLABS_BASE_URL": "ftp://x"}, "ELEVENLABS_BASE_URL"),
        (
            {"VOICE_PROVIDER": "elevenlabs", "ELEVENLABS_VOICE_ID": "has spaces"},
            "ELEVENLABS_VOICE_ID",
        ),
        ({"VOICE_BACKEND": "gemini"}, "VOICE_BACKEND"),
        # GPT-Live has no text-only replies for ElevenLabs to speak.
        ({"VOICE_BACKEND": "live", "VOICE_PROVIDER": "elevenlabs"}, "VOICE_BACKEND"),
    ],
)
def test_a_bad_voice_combination_names_its_variable(env, variable):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert err.value.variable == variable
