"""URL ranking and presigned-URL stripping (DESIGN.md: CDN/accelerated > regular > path-style)."""

import pytest

from lora_pipeline.registry.urls import UrlRank, is_presigned, stable_url, url_rank

ACCEL = "https://loras-prod.s3-accelerate.amazonaws.com/loras/s/s_v1.safetensors"
REGULAR = "https://loras-prod.s3.us-west-1.amazonaws.com/loras/s/s_v1.safetensors"
PATH = "https://s3.us-west-1.amazonaws.com/loras-prod/loras/s/s_v1.safetensors"


@pytest.mark.parametrize(
    ("url", "rank"),
    [
        (ACCEL, UrlRank.ACCELERATED),
        ("https://d111111abcdef8.cloudfront.net/loras/s/s_v1.safetensors", UrlRank.ACCELERATED),
        ("https://cdn.example.com/loras/s/s_v1.safetensors", UrlRank.ACCELERATED),
        (REGULAR, UrlRank.REGULAR),
        ("https://loras-prod.s3.amazonaws.com/loras/s/s_v1.safetensors", UrlRank.REGULAR),
        (PATH, UrlRank.PATH_STYLE),
        ("https://s3api-eu-ro-1.runpod.io/tqv92ffpc5/loras/s/s_v1.safetensors", UrlRank.PATH_STYLE),
        ("http://127.0.0.1:5000/bucket/loras/s/s_v1.safetensors", UrlRank.PATH_STYLE),
        ("file:///tmp/store/loras/s/s_v1.safetensors", UrlRank.LOCAL),
        ("ftp://example.com/x", UrlRank.INVALID),
    ],
)
def test_url_rank_orders_cdn_over_regular_over_path_style(url, rank):
    assert url_rank(url) is rank


@pytest.mark.parametrize(
    "query",
    [
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=a&X-Amz-Expires=3600&X-Amz-Signature=abc",
        "AWSAccessKeyId=AKIA&Signature=abc&Expires=1700000000",
        "Expires=1700000000",
    ],
)
def test_presigned_urls_are_recognised_and_reduced_to_their_stable_form(query):
    url = f"{REGULAR}?{query}"
    assert is_presigned(url)
    assert stable_url(url) == REGULAR


def test_plain_urls_with_other_queries_are_kept_as_they_are():
    url = f"{ACCEL}?versionId=3"
    assert not is_presigned(url)
    assert stable_url(url) == url


def test_unusable_urls_are_not_stored():
    assert stable_url("not a url") is None
    assert stable_url("") is None
