"""Low-quality text under our control, to make a mixed-quality training stream (the noise of the Rho-1 study):

* :func:`shuffled_words` -- a real paragraph with its words in random order: real vocabulary and word
  frequencies, no syntax (word-salad spam, scrambled extraction);
* :func:`templated_junk` -- boilerplate from templates with random fields: navigation bars, cookie banners,
  spam offers, tracking ids and tag clouds (web-crawl leftovers; repetitive, partly random strings).

Both are deterministic functions of a ``random.Random``.
"""

from __future__ import annotations

import random
import string

__all__ = ["JUNK_KINDS", "shuffled_words", "templated_junk"]

_ITEMS = ("ringtones", "casino bonus", "diet pills", "cheap flights", "phone cases", "crypto signals", "watches",
          "free movies", "essay writing", "car insurance", "weight loss tea", "VPN deals")
_SITES = ("bestdeals", "topoffers", "clickhere", "megasale", "freestuff", "quickcash", "newsfeed24", "linkhub")
_NAV = ("Home", "About", "Contact", "Privacy Policy", "Terms of Use", "Login", "Register", "Cart", "FAQ", "Blog",
        "Sitemap", "Careers", "Help", "Subscribe", "Share", "Print", "Next", "Previous", "Top")
_TEMPLATES = (
    "Click here to get {item} for only ${price}! Limited offer, {n} left in stock. Visit www.{site}.com now!",
    "BUY {ITEM} NOW!!! {n}% OFF TODAY ONLY at {site}.net - free shipping on orders over ${price}.",
    ("This website uses cookies to improve your experience. By clicking Accept you agree to our cookie policy. "
     "Session ID: {hex} Accept | Decline | Settings"),
    "{nav}",
    "Posted by user{n} on {day}/{month}/20{yy} at {hh}:{mm} | {n2} comments | Tags: {tags}",
    "Related searches: {item} online, cheap {item}, {item} review, best {item} {yy}, {item} near me, buy {item}",
    "Error {n}: page not found. Return to {site}.org or try again later. Ref: {hex}",
    "Download {item} free full version crack keygen serial {hex} working 100% no virus {site}.ru",
)
JUNK_KINDS = ("shuffled", "templated")


def shuffled_words(text: str, rng: random.Random) -> str:
    """``text`` with its whitespace-separated words in a random order."""
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _fill(template: str, rng: random.Random) -> str:
    item = rng.choice(_ITEMS)
    return template.format(
        item=item, ITEM=item.upper(), price=rng.randint(1, 999), n=rng.randint(2, 99), n2=rng.randint(0, 500),
        site=rng.choice(_SITES), hex="".join(rng.choices(string.hexdigits.lower(), k=16)),
        nav=" | ".join(rng.sample(_NAV, rng.randint(5, 10))), day=rng.randint(1, 28), month=rng.randint(1, 12),
        yy=rng.randint(10, 29), hh=rng.randint(0, 23), mm=f"{rng.randint(0, 59):02d}",
        tags=", ".join(rng.sample(_ITEMS, 4)))


def templated_junk(rng: random.Random, min_chars: int = 300) -> str:
    """Boilerplate lines from the templates, random fields filled in, joined until ``min_chars``."""
    out: list[str] = []
    n = 0
    while n < min_chars:
        line = _fill(rng.choice(_TEMPLATES), rng)
        out.append(line)
        n += len(line) + 1
    return " ".join(out)
