from pathlib import Path

import pytest

from gateway.privacy import is_erasure_request
from gateway.usage import Prices, PriceTableError, cost_usd, load_prices


@pytest.mark.parametrize(
    "text",
    [
        "Quero que vocês apaguem meus dados, por favor",
        "Por favor exclua todas as minhas informações",
        "me esquece, apaga o meu número",
        "Pode deletar o histórico da nossa conversa?",
        "meus dados, pode apagar tudo",
        "please delete my data",
    ],
)
def test_erasure_requests_are_recognised(text):
    assert is_erasure_request(text)


@pytest.mark.parametrize(
    "text",
    [
        "apaguei a luz da sala",
        "vou remover o anúncio antigo",
        "meus dados estão certos?",
        "Quero excluir o imóvel do anúncio",
        "",
    ],
)
def test_ordinary_sentences_are_not_erasure_requests(text):
    assert not is_erasure_request(text)


def test_cost_splits_text_and_audio_tokens():
    prices = Prices(text_in=4, text_out=16, audio_in=32, audio_out=64)
    row = {"input_tokens": 1000, "input_audio_tokens": 800, "output_tokens": 500,
           "output_audio_tokens": 400}  # fmt: skip
    expected = (200 * 4 + 800 * 32 + 100 * 16 + 400 * 64) / 1_000_000
    assert cost_usd(prices, row) == pytest.approx(expected)
    assert cost_usd(None, row) is None


def test_the_shipped_price_table_loads_and_a_broken_one_is_named(tmp_path):
    table = load_prices(Path("config/prices.toml"))
    assert table["gpt-realtime-2.1"].audio_out == 64.0
    assert load_prices(tmp_path / "missing.toml") == {}
    broken = tmp_path / "prices.toml"
    broken.write_text('[models."x"]\nunknown_field = 1\n')
    with pytest.raises(PriceTableError, match=str(broken)):
        load_prices(broken)


def test_elevenlabs_characters_are_priced_per_thousand():
    table = load_prices(Path("config/prices.toml"))
    flash = table["eleven_flash_v2_5"]
    assert flash.per_1k_characters > 0 and flash.audio_out == 0
    row = {"characters": 2000, "audio_seconds": 30.0}
    assert cost_usd(flash, row) == pytest.approx(2 * flash.per_1k_characters)
    # A Realtime row has no characters: its price is unchanged by the new column.
    realtime = table["gpt-realtime-2.1"]
    assert cost_usd(realtime, {"output_audio_tokens": 1_000_000, "output_tokens": 1_000_000}) == (
        pytest.approx(realtime.audio_out)
    )
