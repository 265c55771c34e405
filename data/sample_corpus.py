"""A built-in sample corpus in SlimPajama's on-disk format, generated without any download.

Synthetic but learnable (a fixed world of facts, repeated entities, correct arithmetic and code),
deterministic per ``(seed, split, index)``. Layout and structure: docs/data.md, "The built-in
sample corpus".
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

__all__ = ["SET_NAMES", "write_sample_corpus", "generate_document"]

# Written last: its presence (with matching parameters) means the corpus is complete.
MARKER_NAME = ".sample_corpus_complete.json"
# Bump when the generators change, so an old corpus on disk is regenerated, not reused.
GENERATOR_VERSION = 1
# Fixed zstd level: compression output must not depend on library defaults for determinism.
_ZSTD_LEVEL = 3

# ---------------------------------------------------------------------------------------------
# Vocabulary for generated names and facts.
# ---------------------------------------------------------------------------------------------

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "st",
    "tr",
    "sh",
    "th",
    "gr",
    "pl",
    "h",
    "j",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "st"]

_CONTINENTS = ["Norvania", "Sudrel", "Estmark", "Westhalla"]
_DIRECTIONS = ["north", "south", "east", "west", "centre"]
_RIVER_WORDS = ["river", "lake", "bay", "valley"]
_INDUSTRIES = [
    "wool",
    "grain",
    "salt",
    "timber",
    "copper",
    "fish",
    "glass",
    "wine",
    "paper",
    "iron",
]
_PROFESSIONS = [
    "chemist",
    "painter",
    "poet",
    "engineer",
    "astronomer",
    "composer",
    "architect",
    "botanist",
    "historian",
    "mathematician",
]
_WORKS = {
    "chemist": "a study of {x} salts",
    "painter": "a series of paintings of {x}",
    "poet": "a book of poems about {x}",
    "engineer": "a bridge over the river {x}",
    "astronomer": "a catalogue of stars seen from {x}",
    "composer": "a symphony named after {x}",
    "architect": "the town hall of {x}",
    "botanist": "a guide to the plants of {x}",
    "historian": "a history of {x}",
    "mathematician": "a proof known as the {x} theorem",
}
_ANIMALS = ["fox", "owl", "rabbit", "cat", "dog", "goat", "crow", "bear", "duck", "mouse"]
_OBJECTS = ["key", "lamp", "map", "coin", "book", "bell", "basket", "ribbon", "stone", "box"]
_PLACES = [
    "forest",
    "market",
    "river",
    "hill",
    "garden",
    "mill",
    "harbour",
    "bridge",
    "field",
    "well",
]
_COLOURS = ["red", "blue", "green", "yellow", "white", "black", "silver", "brown"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_FOODS = ["bread", "soup", "cake", "pie", "stew", "porridge", "salad", "pancakes"]
_INGREDIENTS = [
    "flour",
    "butter",
    "eggs",
    "milk",
    "sugar",
    "salt",
    "onions",
    "carrots",
    "apples",
    "cheese",
    "honey",
    "rice",
    "beans",
    "tomatoes",
]
_SHOPS = ["Bakery", "Library", "Pharmacy", "Museum", "Post Office", "Market Hall", "Bookshop"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _name(rng: random.Random, min_syl: int = 2, max_syl: int = 3) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(min_syl, max_syl))).capitalize()


def _thousands(n: int) -> str:
    return f"{n:,}"


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str
    currency: str
    continent: str
    founded: int


def _make_world(seed: int, n_countries: int = 24) -> list[Country]:
    """The fixed set of countries every document draws from (same for train and validation)."""
    rng = random.Random(f"sample-corpus-world:{seed}")
    countries: list[Country] = []
    used: set[str] = set()
    while len(countries) < n_countries:
        stem = _name(rng, 2, 2)
        if stem in used:
            continue
        used.add(stem)
        capital = _name(rng, 2, 3)
        countries.append(
            Country(
                name=stem + rng.choice(["ia", "land", "mark", "stan", "ora"]),
                capital=capital,
                language=stem + rng.choice(["ish", "ic", "ese", "i"]),
                currency=_syllable(rng).lower(),
                continent=rng.choice(_CONTINENTS),
                founded=rng.randint(1100, 1900),
            )
        )
    return countries


# ---------------------------------------------------------------------------------------------
# Document generators. Each takes (rng, world) and returns the document text.
# ---------------------------------------------------------------------------------------------


def _wiki_town(rng: random.Random, world: list[Country]) -> str:
    c = rng.choice(world)
    town = _name(rng)
    other = rng.choice(world)
    founded = rng.randint(max(c.founded, 1200), 1950)
    pop = rng.randint(800, 900_000)
    river = _name(rng, 2, 2)
    dist = rng.randint(5, 400)
    ind1, ind2 = rng.sample(_INDUSTRIES, 2)
    direction = rng.choice(_DIRECTIONS)
    event_year = rng.randint(founded + 10, founded + 60)
    return (
        f"{town}\n\n"
        f"{town} is a town in {c.name}, located in the {direction} of the country. "
        f"It was founded in {founded} by settlers from {other.name}. "
        f"As of 2010, {town} had a population of {_thousands(pop)}.\n\n"
        f"History\n"
        f"{town} was founded in {founded}. In {event_year} the town became a market centre "
        f"for {ind1} and {ind2}. Trade in {ind1} made {town} one of the richest towns in "
        f"the {direction} of {c.name}.\n\n"
        f"Geography\n"
        f"{town} lies on the river {river}, {dist} km from {c.capital}, the capital of {c.name}. "
        f"{c.name} is a country in {c.continent}.\n\n"
        f"Summary\n"
        f"{town} is a town in {c.name}. It was founded in {founded} and has a population of "
        f"{_thousands(pop)}. The official language of {c.name} is {c.language}, "
        f"and its currency is the {c.currency}.\n"
    )


def _wiki_person(rng: random.Random, world: list[Country]) -> str:
    c = rng.choice(world)
    first, last = _name(rng, 2, 2), _name(rng, 2, 3)
    born = rng.randint(1700, 1950)
    age = rng.randint(25, 95)
    died = born + age
    job = rng.choice(_PROFESSIONS)
    town = _name(rng)
    pronoun, possessive = rng.choice([("He", "His"), ("She", "Her")])
    work_year = born + rng.randint(20, max(21, age - 2))
    work = _WORKS[job].format(x=town)
    return (
        f"{first} {last}\n\n"
        f"{first} {last} ({born} - {died}) was a {c.language} {job}. "
        f"{pronoun} was born in {town}, {c.name}, in {born}. "
        f"{pronoun} studied in {c.capital}, the capital of {c.name}.\n\n"
        f"Career\n"
        f"In {work_year}, {last} completed {work}. "
        f"{possessive} work made {last} one of the best known {job}s of {c.name}.\n\n"
        f"Death\n"
        f"{last} died in {died} at the age of {age}. "
        f"{first} {last} was born in {born} and died in {died}, so {last} lived {age} years.\n"
    )


def _wikipedia(rng: random.Random, world: list[Country]) -> str:
    return _wiki_town(rng, world) if rng.random() < 0.6 else _wiki_person(rng, world)


def _arxiv(rng: random.Random, world: list[Country]) -> str:
    del world
    lines = [f"Exercise {rng.randint(1, 99)}. Compute the following.", ""]
    lines.append("Sums:")
    for _ in range(rng.randint(6, 12)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a} + {b} = {a + b}")
    lines.append("")
    lines.append("Differences:")
    for _ in range(rng.randint(4, 8)):
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        lines.append(f"{a} - {b} = {a - b}")
    lines.append("")
    k = rng.randint(2, 12)
    lines.append(f"Multiplication table of {k}:")
    for i in range(1, rng.randint(6, 10) + 1):
        lines.append(f"{k} * {i} = {k * i}")
    lines.append("")
    n = rng.randint(2, 20)
    lines.append(
        f"Lemma. Let n = {n}. Then n * n = {n * n}, 2 * n + 1 = {2 * n + 1}, "
        f"and n * (n + 1) / 2 = {n * (n + 1) // 2}."
    )
    lines.append(
        f"Proof. Since n = {n}, we have n * n = {n} * {n} = {n * n}. "
        f"The sum 1 + 2 + ... + {n} equals {n * (n + 1) // 2}."
    )
    return "\n".join(lines) + "\n"


# Python snippets: (function source template, call builder). Names and values are drawn per doc.
def _py_scale(rng: random.Random) -> str:
    fn = rng.choice(["scale", "multiply_all", "times", "scale_values"])
    var = rng.choice(["values", "numbers", "items", "xs"])
    factor = rng.randint(2, 9)
    data = [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]
    return (
        f"def {fn}({var}, factor):\n"
        f'    """Return every element of {var} multiplied by factor."""\n'
        f"    result = []\n"
        f"    for value in {var}:\n"
        f"        result.append(value * factor)\n"
        f"    return result\n\n\n"
        f"print({fn}({data}, {factor}))  # -> {[v * factor for v in data]}\n"
    )


def _py_sum(rng: random.Random) -> str:
    fn = rng.choice(["total", "sum_list", "add_all", "accumulate"])
    var = rng.choice(["values", "numbers", "items", "xs"])
    data = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
    return (
        f"def {fn}({var}):\n"
        f'    """Return the sum of {var}."""\n'
        f"    total = 0\n"
        f"    for value in {var}:\n"
        f"        total = total + value\n"
        f"    return total\n\n\n"
        f"print({fn}({data}))  # -> {sum(data)}\n"
    )


def _py_count(rng: random.Random) -> str:
    fn = rng.choice(["count_matches", "count_items", "occurrences"])
    data = [rng.randint(0, 4) for _ in range(rng.randint(5, 9))]
    target = rng.randint(0, 4)
    return (
        f"def {fn}(items, target):\n"
        f'    """Count how many elements of items are equal to target."""\n'
        f"    count = 0\n"
        f"    for item in items:\n"
        f"        if item == target:\n"
        f"            count += 1\n"
        f"    return count\n\n\n"
        f"print({fn}({data}, {target}))  # -> {data.count(target)}\n"
    )


def _py_max(rng: random.Random) -> str:
    fn = rng.choice(["largest", "find_max", "maximum"])
    data = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    return (
        f"def {fn}(values):\n"
        f'    """Return the largest element of a non-empty list."""\n'
        f"    best = values[0]\n"
        f"    for value in values[1:]:\n"
        f"        if value > best:\n"
        f"            best = value\n"
        f"    return best\n\n\n"
        f"print({fn}({data}))  # -> {max(data)}\n"
    )


def _py_class(rng: random.Random) -> str:
    cls = rng.choice(["Counter", "Tally", "Clicker"])
    start = rng.randint(0, 10)
    steps = rng.randint(1, 6)
    return (
        f"class {cls}:\n"
        f'    """A counter that starts at a given value."""\n\n'
        f"    def __init__(self, start={start}):\n"
        f"        self.value = start\n\n"
        f"    def increment(self):\n"
        f"        self.value += 1\n"
        f"        return self.value\n\n\n"
        f"counter = {cls}()\n"
        f"for _ in range({steps}):\n"
        f"    counter.increment()\n"
        f"print(counter.value)  # -> {start + steps}\n"
    )


def _py_country(rng: random.Random, world: list[Country]) -> str:
    picked = rng.sample(world, rng.randint(3, 5))
    body = "".join(f'    "{c.name}": "{c.capital}",\n' for c in picked)
    c = rng.choice(picked)
    return (
        f"CAPITALS = {{\n{body}}}\n\n\n"
        f"def capital_of(country):\n"
        f'    """Return the capital city of country."""\n'
        f"    return CAPITALS[country]\n\n\n"
        f'print(capital_of("{c.name}"))  # -> {c.capital}\n'
    )


def _github(rng: random.Random, world: list[Country]) -> str:
    makers: list[Callable[[random.Random], str]] = [
        _py_scale,
        _py_sum,
        _py_count,
        _py_max,
        _py_class,
    ]
    parts = [f"# {_name(rng, 2, 2).lower()}_utils.py\n\n"]
    for i in range(rng.randint(2, 3)):
        if i > 0:
            parts.append("\n\n")
        if rng.random() < 0.2:
            parts.append(_py_country(rng, world))
        else:
            parts.append(rng.choice(makers)(rng))
    return "".join(parts)


def _stackexchange(rng: random.Random, world: list[Country]) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(3, 5)):
        c = rng.choice(world)
        kind = rng.randrange(5)
        if kind == 0:
            q = f"What is the capital of {c.name}?"
            a = f"The capital of {c.name} is {c.capital}."
        elif kind == 1:
            q = f"Which language is spoken in {c.name}?"
            a = f"The official language of {c.name} is {c.language}."
        elif kind == 2:
            q = f"What currency does {c.name} use?"
            a = f"{c.name} uses the {c.currency}. Prices in {c.capital} are given in {c.currency}."
        elif kind == 3:
            q = f"On which continent is {c.name}?"
            a = f"{c.name} is in {c.continent}. Its capital, {c.capital}, is also in {c.continent}."
        else:
            w = rng.randint(2, 9)
            q = f"How many days are there in {w} weeks?"
            a = f"There are 7 days in a week, so {w} weeks have {7 * w} days."
        parts.append(f"Q: {q}\nA: {a}\n")
    return "\n".join(parts)


def _story(rng: random.Random, world: list[Country]) -> str:
    c = rng.choice(world)
    hero = _name(rng, 2, 2)
    animal = rng.choice(_ANIMALS)
    obj = rng.choice(_OBJECTS)
    colour = rng.choice(_COLOURS)
    place1, place2 = rng.sample(_PLACES, 2)
    friend = _name(rng, 2, 2)
    friend_animal = rng.choice(_ANIMALS)
    return (
        f"Once upon a time, in a village near {c.capital}, there lived a little {animal} "
        f"named {hero}. Every morning {hero} the {animal} walked to the {place1}.\n\n"
        f"One day, at the {place1}, {hero} found a {colour} {obj}. "
        f'"Whose {obj} is this?" asked {hero}. Nobody answered, so {hero} took the '
        f"{colour} {obj} to the {place2}.\n\n"
        f"At the {place2}, {hero} met {friend} the {friend_animal}. "
        f'"That is my {colour} {obj}!" said {friend}. "I lost it yesterday." '
        f"{hero} gave the {colour} {obj} to {friend}, and {friend} the {friend_animal} "
        f"was very happy.\n\n"
        f"From that day on, {hero} the {animal} and {friend} the {friend_animal} were "
        f"best friends. The end.\n"
    )


def _schedule(rng: random.Random, world: list[Country]) -> str:
    c = rng.choice(world)
    town = _name(rng)
    shop = rng.choice(_SHOPS)
    open_h = rng.randint(6, 10)
    close_h = rng.randint(16, 20)
    closed_day = rng.choice(_DAYS)
    lines = [f"{town} {shop} - opening hours", ""]
    for day in _DAYS:
        if day == closed_day:
            lines.append(f"{day}: closed")
        else:
            lines.append(f"{day}: {open_h}:00 to {close_h}:00")
    lines.append("")
    lines.append(
        f"The {town} {shop} is open from {open_h}:00 to {close_h}:00, "
        f"that is {close_h - open_h} hours a day, every day except {closed_day}. "
        f"{town} is in {c.name}; prices are in {c.currency}."
    )
    return "\n".join(lines) + "\n"


def _recipe(rng: random.Random, world: list[Country]) -> str:
    c = rng.choice(world)
    food = rng.choice(_FOODS)
    ingredients = rng.sample(_INGREDIENTS, rng.randint(3, 5))
    servings = rng.randint(2, 6)
    minutes = rng.choice([10, 15, 20, 25, 30, 40, 45, 60])
    lines = [f"{c.language} {food} for {servings} people", "", "Ingredients:"]
    for ing in ingredients:
        lines.append(f"- {rng.randint(1, 5) * 100} g of {ing}")
    lines.append("")
    lines.append("Steps:")
    for i, ing in enumerate(ingredients, start=1):
        lines.append(f"{i}. Add the {ing}.")
    lines.append(f"{len(ingredients) + 1}. Cook for {minutes} minutes.")
    lines.append("")
    lines.append(
        f"This {c.language} {food} serves {servings} people and takes {minutes} minutes "
        f"to cook. It is popular in {c.capital}."
    )
    return "\n".join(lines) + "\n"


def _commoncrawl(rng: random.Random, world: list[Country]) -> str:
    return (_schedule if rng.random() < 0.5 else _recipe)(rng, world)


# (set name, probability, generator). Several set names so mixture weights downstream mean
# something; the probabilities roughly follow how prose-heavy SlimPajama is.
_GENERATORS: list[tuple[str, float, Callable[[random.Random, list[Country]], str]]] = [
    ("RedPajamaWikipedia", 0.30, _wikipedia),
    ("RedPajamaCommonCrawl", 0.20, _commoncrawl),
    ("RedPajamaGithub", 0.15, _github),
    ("RedPajamaArXiv", 0.15, _arxiv),
    ("RedPajamaStackExchange", 0.10, _stackexchange),
    ("RedPajamaBook", 0.10, _story),
]
SET_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _GENERATORS)


def generate_document(seed: int, split: str, index: int) -> dict[str, object]:
    """One SlimPajama-style record; a pure function of (seed, split, index)."""
    world = sample_world(seed)
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs/platforms.
    rng = random.Random(f"sample-corpus:{seed}:{split}:{index}")
    r = rng.random()
    cumulative = 0.0
    name, _, gen = _GENERATORS[-1]
    for candidate in _GENERATORS:
        cumulative += candidate[1]
        if r < cumulative:
            name, _, gen = candidate
            break
    return {"text": gen(rng, world), "meta": {"redpajama_set_name": name}}


_WORLDS: dict[int, list[Country]] = {}


def sample_world(seed: int) -> list[Country]:
    if seed not in _WORLDS:
        _WORLDS[seed] = _make_world(seed)
    return _WORLDS[seed]


# ---------------------------------------------------------------------------------------------
# Writing the files.
# ---------------------------------------------------------------------------------------------


def _write_shard(path: Path, records: list[dict[str, object]]) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    # One-shot compress (not streaming) so the frame header carries the content size and the
    # bytes are identical run to run.
    data = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(payload)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # never leave a truncated shard under the final name


def _split_files(out_dir: Path, split: str, prefix: str, n_docs: int, per_shard: int) -> list[Path]:
    n_shards = (n_docs + per_shard - 1) // per_shard
    return [out_dir / split / "chunk1" / f"{prefix}_{i}.jsonl.zst" for i in range(n_shards)]


def write_sample_corpus(
    out_dir: str | Path,
    seed: int = 0,
    train_docs: int = 6000,
    val_docs: int = 300,
    docs_per_shard: int = 1000,
) -> Path:
    """Write the sample corpus under ``out_dir`` (SlimPajama layout) and return ``out_dir``.

    Idempotent: if ``out_dir`` already holds a complete corpus written with the same
    parameters, nothing is rewritten. A corpus with other parameters is regenerated in place
    (stale shards of ours beyond the new shard count are removed).
    """
    if train_docs < 1 or val_docs < 1:
        raise ValueError(
            f"write_sample_corpus needs at least one train and one validation document, "
            f"got train_docs={train_docs}, val_docs={val_docs}."
        )
    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be >= 1, got {docs_per_shard}.")

    out = Path(out_dir)
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "train_docs": train_docs,
        "val_docs": val_docs,
        "docs_per_shard": docs_per_shard,
    }
    plan = {
        ("train", "example_train", train_docs): _split_files(
            out, "train", "example_train", train_docs, docs_per_shard
        ),
        ("validation", "example_holdout", val_docs): _split_files(
            out, "validation", "example_holdout", val_docs, docs_per_shard
        ),
    }
    marker = out / MARKER_NAME
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            recorded = None
        all_files = [p for files in plan.values() for p in files]
        if recorded == params and all(p.is_file() for p in all_files):
            return out
        # Parameters changed or files were removed: invalidate before rewriting, so a crash
        # mid-rewrite cannot leave a marker that vouches for a mixed corpus.
        marker.unlink()

    for (split, prefix, n_docs), files in plan.items():
        chunk_dir = out / split / "chunk1"
        chunk_dir.mkdir(parents=True, exist_ok=True)
        # Remove our own shards left over from an earlier, larger corpus (same prefix only).
        wanted = {p.name for p in files}
        for stale in chunk_dir.glob(f"{prefix}_*.jsonl.zst"):
            if stale.name not in wanted:
                stale.unlink()
        for shard_idx, path in enumerate(files):
            start = shard_idx * docs_per_shard
            stop = min(start + docs_per_shard, n_docs)
            _write_shard(path, [generate_document(seed, split, i) for i in range(start, stop)])

    marker.write_text(json.dumps(params, indent=2) + "\n")
    return out


def prepare_sample_tokens(
    out_dir: str | Path, train_docs: int, val_docs: int, vocab_size: int = 1024
) -> tuple[Path, Path]:
    """The sample corpus at this size, a BPE tokenizer trained on it and its token chunks, under
    ``out_dir`` (raw/, tokenizer.model, tokens/); done once: a prepared directory is reused.
    Returns (tokens dir, tokenizer path). For studies that want more text than the demo's."""
    from data.prepare import PrepareOptions, is_prepared, prepare_dataset  # the data stack, on use
    from data.tokenizer import train_tokenizer

    out = Path(out_dir)
    raw, tokens, prefix = out / "raw", out / "tokens", out / "tokenizer"
    tokenizer = Path(f"{prefix}.model")
    if not is_prepared(tokens):
        write_sample_corpus(raw, train_docs=train_docs, val_docs=val_docs, docs_per_shard=2000)
        tokenizer = train_tokenizer(raw / "train", prefix, vocab_size=vocab_size)
        prepare_dataset(PrepareOptions(raw, tokens, tokenizer, num_workers=1))
    return tokens, tokenizer
