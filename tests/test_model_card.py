"""The model card (app/contract.py) and its short form in every answer (app/schemas.py).

Mitchell et al. (2019), "Model Cards for Model Reporting": intended use, out-of-scope
uses, limitations, training and evaluation data, metrics with their data set.
"""

from __future__ import annotations

from app import contract
from app.contract import ModelCard, complete_card, short_form, states_no_preprocessing
from app.schemas import model_summary

OLD_CARD = {  # a card written before the use fields existed
    "name": "fpn-resnet50v2-covidctset",
    "version": "0.0.0+untrained.seed0",
    "weights_source": "untrained",
    "created_at": "2026-11-20T10:00:00+00:00",
}


def test_an_old_card_still_reads_and_states_nothing_it_never_said() -> None:
    card = ModelCard.model_validate(OLD_CARD)
    assert card.preprocessing is None and card.intended_use is None


def test_completion_fills_the_use_fields_and_keeps_what_a_card_says() -> None:
    card = complete_card(ModelCard.model_validate({**OLD_CARD, "intended_use": "our own text"}))
    assert card.intended_use == "our own text"
    assert card.preprocessing == "none: raw stored values (HU + 1024)"
    assert card.out_of_scope_uses is not None and len(card.out_of_scope_uses) == 5
    assert card.limitations is not None
    assert card.limitations[0].startswith("Trained on COVID-19 and normal scans only")
    assert complete_card(card) == card


def test_the_short_form_is_intended_use_and_main_limitation() -> None:
    card = complete_card(ModelCard.model_validate(OLD_CARD))
    use, limit = short_form(card)
    assert "COVID-19 from normal lungs" in use and "axial non-contrast chest CT of adults" in use
    assert "community-acquired" in limit and "may well be called COVID-19" in limit
    # A card without the fields (older exports) still answers with the service's texts.
    assert short_form(ModelCard.model_validate(OLD_CARD)) == (use, limit)


def test_every_answer_carries_the_short_form() -> None:
    summary = model_summary(complete_card(ModelCard.model_validate(OLD_CARD))).model_dump()
    assert summary["intended_use"] == contract.INTENDED_USE
    assert summary["main_limitation"] == contract.MAIN_LIMITATION
    assert summary["untrained"] is True


def test_none_is_read_from_the_start_of_the_preprocessing_text() -> None:
    assert states_no_preprocessing("none: raw stored values (HU + 1024)")
    assert states_no_preprocessing("None")
    assert not states_no_preprocessing("per-slice maximum: none of the values kept")
    assert not states_no_preprocessing("x / 4096")
