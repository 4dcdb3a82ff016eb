import pytest

from gateway.phones import mask_number, normalize_number, phone_hint


def test_whatsapp_and_phone_numbers_are_one_person():
    assert normalize_number("whatsapp:+5516999990001") == "+5516999990001"
    assert normalize_number(" +55 (16) 99999-0001 ") == "+5516999990001"
    with pytest.raises(ValueError):
        normalize_number("whatsapp:")


def test_phone_numbers_are_masked():
    assert mask_number("whatsapp:+5516999990001") == "+55…0001"
    assert "99999" not in mask_number("+5516999990001")


def test_the_prompt_sees_only_the_masked_number():
    assert phone_hint("+5516999990001") == "+55…0001"
