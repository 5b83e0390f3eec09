"""The summary's ``image_url``: the primary image, largest size first, in both dialects."""

from __future__ import annotations

from broker.api import creators, paapi5

URL = "https://m.media-amazon.com/images/I/41cNJGm9ZFL"


def test_creators_takes_the_largest_primary_image() -> None:
    """Creators: images.primary.large wins over medium and small; variants are ignored."""
    item = {
        "asin": "B000000001",
        "images": {
            "primary": {
                "hiRes": None,
                "large": {"url": f"{URL}._SL500_.jpg", "height": 500, "width": 500},
                "medium": {"url": f"{URL}._SL160_.jpg", "height": 160, "width": 160},
                "small": None,
            },
            "variants": [{"large": {"url": "https://example.invalid/variant.jpg"}}],
        },
    }
    assert creators._summary(item).image_url == f"{URL}._SL500_.jpg"


def test_paapi_reads_the_pascal_case_spelling() -> None:
    """PA-API: Images.Primary.Medium.URL when it is the only size asked for."""
    item = {"ASIN": "B000000001", "Images": {"Primary": {"Medium": {"URL": f"{URL}.jpg"}}}}
    assert paapi5._summary(item).image_url == f"{URL}.jpg"


def test_no_image_gives_none() -> None:
    """An item without images (or with a malformed images member) has image_url None."""
    assert creators._summary({"asin": "B000000001"}).image_url is None
    assert creators._summary({"images": {"primary": {"large": "x"}}}).image_url is None
    assert paapi5._summary({"Images": None}).image_url is None
    assert creators._summary({"asin": "B000000001"}).to_json()["image_url"] is None
