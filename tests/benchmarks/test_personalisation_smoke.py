"""benchmarks/personalisation.py: its concept set is training-only and outlined, its token prompts fit digits-clip's 24
tokens (a truncated token would teach nothing), and its concept classifier separates the styles on held-out digits, as drawn and
through digits-sd's autoencoder."""
import numpy as np
import pytest

pytest.importorskip("sklearn")

from benchmarks import personalisation as P  # noqa: E402
from jaxdiff import builtin  # noqa: E402
from jaxdiff import textual_inversion as ti  # noqa: E402
from jaxdiff.data import digits_text as dt  # noqa: E402
from jaxdiff.textual_inversion import Embedding  # noqa: E402

pytestmark = pytest.mark.xla_optimized  # runs its programs more than it compiles them (tests/conftest.py)


@pytest.fixture(scope="module")
def sets():
    return dt.load_digits_text()


def test_concept_set_is_outlined_training_digits(sets):
    c = P.concept_set(sets["train"])
    assert len(c["caption"]) == P.CONCEPT_EXAMPLES and len(np.unique(sets["train"]["source"][c["index"]])) == 200
    attrs = dt.measure_attributes(c["image"], c["label"])
    np.testing.assert_array_equal(attrs["ink"], sets["train"]["ink"][c["index"]])  # colours kept


def test_token_prompts_fit_the_text_encoder(sets):
    sd = builtin.load_pipeline("digits-sd")
    sd = ti.add_embeddings(sd, [Embedding(P.TOKEN, np.zeros((2, 64), np.float32), "test")])
    captions = [str(c) for c in sets["held_out"]["caption"]] + P.concept_set(sets["train"])["caption"]
    ids = sd.tokenize(P.with_token(captions))
    token_ids = ti.token_ids(sd, P.TOKEN)
    assert all(np.isin(token_ids, row).all() for row in ids)  # never cut off by the 24-token limit


def test_concept_classifier_separates_the_styles(sets):
    half = {k: v[: len(v) // 2] for k, v in sets["train"].items()}  # 750 source digits of 1,500: 0.992, 0.980
    c = P.ConceptClassifier(half, sets["held_out"], builtin.load_pipeline("digits-sd"), steps=150)
    assert c.accuracy >= 0.95 and c.roundtrip_accuracy >= 0.95  # the benchmark's 600 steps: 0.997, 0.983
