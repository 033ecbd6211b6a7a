import re

import pytest

from omniforge.errors import CorpusError
from omniforge.pipeline.plan import MAX_KEY_LENGTH, assign_keys, candidate_key

SAFE = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.mark.parametrize("name", ["a.jpg", "dir/sub/photo 1.JPG", "ünïcode/ph#oto%.png", "x.y.z.webp", "000123",
                                  "a" * 400 + ".png", "...", "/leading/slash.jpg", "noext"])
def test_candidate_keys_are_safe(name):
    key = candidate_key(name, "ab" * 32)
    assert SAFE.match(key), key
    assert len(key) <= MAX_KEY_LENGTH


def test_clean_names_keep_readable_keys_and_lossy_names_get_a_hash():
    assert candidate_key("cats/tabby_01.jpg", "0" * 64) == "cats_tabby_01"
    lossy = candidate_key("cats/tabby 01.jpg", "0" * 64)
    assert lossy.startswith("cats_tabby_01-") and lossy != "cats_tabby_01"
    # the hash depends on the original name: two names that sanitize alike stay apart
    assert candidate_key("a b.jpg", "0" * 64) != candidate_key("a+b.jpg", "0" * 64)


def test_content_hash_is_the_last_resort():
    assert candidate_key("", "f" * 64) == "sha256-" + "f" * 20


def test_collisions_are_resolved_deterministically():
    names = ["a.jpg", "a.png", "b.jpg"]
    uris = ["/c/a.jpg", "/c/a.png", "/c/b.jpg"]
    keys = assign_keys(names, uris, ["0" * 64] * 3)
    assert len(set(keys)) == 3
    assert keys[2] == "b"
    assert keys == assign_keys(names, uris, ["0" * 64] * 3)
    with pytest.raises(CorpusError):
        assign_keys(["a.jpg", "a.jpg"], ["/c/a.jpg", "/c/a.jpg"], ["0" * 64] * 2)
