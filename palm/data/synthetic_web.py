"""Synthetic low-quality web text: fluent commercial spam, which passes every Gopher rule (it has the stop
words, word lengths and variety of prose, so only a trained score catches it), and keyword lists (which
Gopher's stop-word rule catches). Used to test and measure the quality classifier (palm.data.quality).

Each generator takes a `random.Random` and returns one document; the same seed gives the same text.
"""

from __future__ import annotations

import random

_PRODUCTS = """watches sneakers headphones sunglasses handbags supplements vitamins mattresses blenders
laptops chargers backpacks jackets perfumes candles rugs lamps drones cameras speakers bikes tents
kettles pillows blankets wallets jewelry cosmetics serums shampoos""".split()
_QUALIFIERS = """cheap affordable premium luxury discount wholesale genuine authentic top-rated best-selling
exclusive limited-edition brand-new certified eco-friendly handmade professional ultimate amazing
unbeatable""".split()
_PLACES = """home office car kitchen bedroom garden gym family friends business travel lifestyle""".split()
_BENEFITS = ["save money", "look great", "feel amazing", "sleep better", "stay healthy", "lose weight",
             "boost your energy", "impress your friends", "upgrade your style", "enjoy every day",
             "get more done", "treat yourself"]
_CITIES = """London Paris Dallas Chicago Miami Toronto Sydney Berlin Madrid Boston Denver Seattle Austin
Atlanta Phoenix""".split()

_SPAM = (
    "Looking for the {Q} {P}? Our {Q} {P} are the perfect choice for your {L}, and we ship to {C} today.",
    "Order now and {B} with the {Q} {P} that everyone is talking about this year.",
    "We offer {Q} {P} at the lowest prices online, with free shipping on every order over {N} dollars.",
    "Do not miss this {Q} deal: buy two {P} and get the third one free for a limited time only.",
    "Thousands of happy customers in {C} trust our {Q} {P} to {B} every single day.",
    "Click here to see why our {Q} {P} are rated number one by experts and real buyers alike.",
    "Save up to {N} percent on {Q} {P} when you sign up for our newsletter and claim your coupon.",
    "If you want to {B}, you need the {Q} {P} from our store, and you need them today.",
    "Our {Q} {P} come with a money-back guarantee, so there is nothing to lose and so much to gain.",
    "Call us now or visit our website to order the {Q} {P} that will change your {L} forever.",
    "The {Q} {P} you have been waiting for are finally back in stock, but hurry before they sell out.",
    "Best {P} in {C}: {Q}, fast delivery, and a price that you will not find anywhere else.",
)


def _fill(template: str, rng: random.Random) -> str:
    pools = {"Q": _QUALIFIERS, "P": _PRODUCTS, "L": _PLACES, "B": _BENEFITS, "C": _CITIES}
    out = []
    for part in template.split("{"):
        if "}" in part:
            slot, rest = part.split("}", 1)
            out.append((str(rng.randint(2, 9) * 10) if slot == "N" else rng.choice(pools[slot])) + rest)
        else:
            out.append(part)
    return "".join(out)


def fluent_spam(rng: random.Random, min_words: int = 80) -> str:
    """Commercial spam in grammatical sentences, in two to four paragraphs."""
    # Each template at most once per document, as a spammer's page varies its pitch: repeated sentences
    # would be caught by Gopher's repetition rules, and this text is meant to pass every rule.
    templates = rng.sample(_SPAM, len(_SPAM))
    paragraphs = []
    words = 0
    while (words < min_words or len(paragraphs) < 2) and templates:
        sentences = [_fill(templates.pop(), rng) for _ in range(min(rng.randint(2, 3), len(templates)))]
        paragraphs.append(" ".join(sentences))
        words += sum(len(s.split()) for s in sentences)
    return "\n\n".join(paragraphs) + "\n"


def keyword_list(rng: random.Random, min_words: int = 80) -> str:
    """Search-engine bait: lines of comma-separated product keywords, no sentences."""
    lines = []
    words = 0
    while words < min_words:
        terms = [f"{rng.choice(_QUALIFIERS)} {rng.choice(_PRODUCTS)}" + (f" {rng.choice(_CITIES)}" if rng.random() < 0.4
                                                                       else "")
                 for _ in range(rng.randint(4, 8))]
        lines.append(", ".join(terms))
        words += sum(len(t.split()) for t in terms)
    return "\n".join(lines) + "\n"


def web_page(rng: random.Random) -> str:
    """One low-quality page: spam two times in three, a keyword list otherwise."""
    return fluent_spam(rng) if rng.random() < 2 / 3 else keyword_list(rng)
