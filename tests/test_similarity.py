import numpy as np
import pytest

from realsyn.similarity import DEFAULT_BANDS, band_reasons, default_band, pair_cosine


def test_default_band_only_for_the_calibrated_model():
    assert DEFAULT_BANDS == {"EVA02-E-14-plus": (0.51, 0.61)}
    assert default_band("EVA02-E-14-plus/laion2b_s9b_b144k", False) == (0.51, 0.61)
    assert default_band("EVA02-E-14-plus", False) == (0.51, 0.61)
    assert default_band("EVA02-E-14-plus/laion2b_s9b_b144k", True) is None
    assert default_band("ViT-B-32/openai", False) is None
    assert default_band("EVA02-L-14/merged2b_s4b_b131k", False) is None


def test_pair_cosine_row_wise():
    img = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    txt = np.array([[2.0, 0.0], [4.0, 3.0], [-1.0, -1.0], [1.0, 0.0]], dtype=np.float32)
    got = pair_cosine(img, txt)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:3], [1.0, 0.96, -1.0], atol=1e-7)
    assert np.isnan(got[3])
    with pytest.raises(ValueError, match="same"):
        pair_cosine(img, txt[:2])


def test_band_reasons_inclusive_bounds():
    sim = np.array([0.50, 0.51, 0.56, 0.61, 0.62, np.nan, -0.2], dtype=np.float32)
    assert band_reasons(sim, 0.51, 0.61) == [
        "similarity_below_band",
        None,
        None,
        None,
        "similarity_above_band",
        "similarity_invalid",
        "similarity_below_band",
    ]
    assert band_reasons(np.array([0.3], dtype=np.float64), -1.0, 1.0) == [None]
    assert band_reasons(np.zeros(0, np.float32), 0.5, 0.6) == []
    with pytest.raises(ValueError):
        band_reasons(sim, 0.7, 0.6)
